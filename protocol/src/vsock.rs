//! vsock for both sides of the agent API: the guest's `AF_VSOCK` sockets,
//! the host's two ways of reaching guest ports, and the readiness line.
//!
//! - [`VsockStream`] / [`VsockListener`]: `AF_VSOCK` stream sockets on
//!   tokio, typed as what they are (not passed off as unix sockets). The
//!   guest listens with them and dials the host ([`dial_host`]); a host with
//!   kernel vhost-vsock dials the guest with them.
//! - [`GuestTransport`]: how the host reaches guest port P. Kernel
//!   vhost-vsock dials `AF_VSOCK` at the guest's CID; hybrid vsock
//!   (`vhost-device-vsock`) connects to the backend's unix socket and sends
//!   `CONNECT P\n`, to which the backend answers `OK <host port>\n`. Guest
//!   connections to host port P arrive on `<uds path>_P`
//!   ([`GuestTransport::host_listener_path`]).
//! - [`Connection`]: either kind of connected stream, for code that serves
//!   both.
//! - The readiness line the agent writes once it serves ([`ready_line`],
//!   [`parse_ready_line`]).

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use crate::fdio::FdStream;
use nix::sys::socket::{
    accept4, bind, connect, getsockopt, listen, socket, sockopt, AddressFamily, Backlog, SockFlag,
    SockType, VsockAddr,
};
use tokio::{
    io::{unix::AsyncFd, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf},
    net::UnixStream,
};

/// vsock CID of the host, as the guest dials it.
pub const HOST_CID: u32 = 2;

/// "Any CID": what a guest listener binds to.
pub const ANY_CID: u32 = u32::MAX;

/// First line the agent writes on the readiness connection, before its
/// version.
pub const READY_LINE_PREFIX: &str = "READY ";

/// Per-connection buffer of the stdio streams, on both ends: the guest's
/// `SO_VM_SOCKETS_BUFFER_SIZE` and the hybrid backend's `tx-buffer-size`.
/// vhost-device-vsock 0.3 tells the guest about freed room only after 3/4 of
/// its buffer moved, while the guest stops sending once the peer's
/// advertised room is used; with the defaults (64 KiB backend, 256 KiB
/// guest) a stream moved in bursts with long waits. 4 MiB on both ends keeps
/// it flowing.
pub const STREAM_BUFFER_BYTES: u64 = 4 * 1024 * 1024;

/// Largest single write the agent makes to a vsock stream. The hybrid
/// backend cannot take a guest packet of more than about 32 KiB spread over
/// several descriptors: it drops it, leaks the descriptors, and every
/// connection of the VM stops. Writes of at most this much stay single
/// packets the backend accepts.
pub const MAX_WRITE: usize = 28 * 1024;

/// `AF_VSOCK` socket options (linux/vm_sockets.h), level `AF_VSOCK`.
const SO_VM_SOCKETS_BUFFER_SIZE: libc::c_int = 0;
const SO_VM_SOCKETS_BUFFER_MAX_SIZE: libc::c_int = 2;

fn set_vsock_u64(fd: &OwnedFd, opt: libc::c_int, value: u64) -> io::Result<()> {
    // SAFETY: setsockopt(2) reads a u64 (the kernel's `unsigned long long`
    // for these options) from a live local, length given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::AF_VSOCK,
            opt,
            (&value as *const u64).cast(),
            std::mem::size_of::<u64>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the receive buffer the socket advertises to its peer (and so how
/// much the peer may send before it waits). Raising the maximum first: the
/// kernel caps the size at it.
fn set_buffer(fd: &OwnedFd, bytes: u64) -> io::Result<()> {
    set_vsock_u64(fd, SO_VM_SOCKETS_BUFFER_MAX_SIZE, bytes)?;
    set_vsock_u64(fd, SO_VM_SOCKETS_BUFFER_SIZE, bytes)
}

/// The longest readiness or handshake line read.
const MAX_LINE: usize = 128;

/// Errors reaching a guest port from the host.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Nothing accepted the connection on the guest port in time.
    #[error("guest vsock port {port} did not accept a connection within {timeout:?}")]
    ConnectTimeout {
        /// Guest port.
        port: u32,
        /// How long we tried.
        timeout: Duration,
    },
    /// The hybrid backend answered the handshake with something else than
    /// `OK`.
    #[error("bad hybrid vsock handshake reply {0:?}")]
    Handshake(String),
    /// A connected socket could not be handed over.
    #[error("cannot use the connection to guest vsock port {port}")]
    Io {
        /// Guest port.
        port: u32,
        /// OS error.
        #[source]
        source: io::Error,
    },
}

impl veil_common::Classify for VsockError {
    fn kind(&self) -> veil_common::Kind {
        match self {
            VsockError::ConnectTimeout { .. }
            | VsockError::Handshake(_)
            | VsockError::Io { .. } => veil_common::Kind::Unavailable,
        }
    }
}

/// A connected `AF_VSOCK` stream socket.
#[derive(Debug)]
pub struct VsockStream(FdStream);

impl VsockStream {
    /// Connects to `cid:port` (non-blocking connect, awaited).
    pub async fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        let pending = match connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)) {
            Ok(()) => false,
            Err(nix::errno::Errno::EINPROGRESS) => true,
            Err(e) => return Err(e.into()),
        };
        let stream = FdStream::new(fd)?;
        if pending {
            let _ready = stream.async_fd().ready(Interest::WRITABLE).await?;
            match getsockopt(stream.async_fd().get_ref(), sockopt::SocketError)? {
                0 => {}
                errno => return Err(io::Error::from_raw_os_error(errno)),
            }
        }
        Ok(VsockStream(stream))
    }

    /// The socket, for code that drives it itself (ttrpc's client, the
    /// agent's splice threads). It stays non-blocking.
    pub fn into_fd(self) -> OwnedFd {
        self.0.into_fd()
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// A listening `AF_VSOCK` socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
    /// Buffer size set on each connection, if one was asked for.
    buffer: Option<u64>,
}

impl VsockListener {
    /// Listens on `port` of any CID.
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        bind(fd.as_raw_fd(), &VsockAddr::new(ANY_CID, port))?;
        listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))?;
        // SAFETY: as in `VsockStream::from_fd`: the AsyncFd owns `fd`.
        let fd = unsafe { AsyncFd::register(fd)? };
        Ok(VsockListener { fd, buffer: None })
    }

    /// Listens on `port` with `bytes` of buffer per connection (see
    /// [`STREAM_BUFFER_BYTES`]); accepted connections are set likewise.
    pub fn bind_with_buffer(port: u32, bytes: u64) -> io::Result<Self> {
        let mut l = Self::bind(port)?;
        set_buffer(l.fd.get_ref(), bytes)?;
        l.buffer = Some(bytes);
        Ok(l)
    }

    /// Waits for the next connection.
    pub async fn accept(&self) -> io::Result<VsockStream> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|l| {
                accept4(
                    l.get_ref().as_raw_fd(),
                    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                )
                .map_err(io::Error::from)
            }) {
                Ok(Ok(raw)) => {
                    // SAFETY: accept4 returned a new, open descriptor that
                    // nothing else owns; the OwnedFd takes sole ownership.
                    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
                    // The kernel gives a connection its listener's sizes;
                    // set again anyway (one syscall per stream), so the
                    // advertised room never depends on that.
                    if let Some(bytes) = self.buffer {
                        let _ = set_buffer(&fd, bytes);
                    }
                    return FdStream::new(fd).map(VsockStream);
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Dials host `port` from the guest.
pub async fn dial_host(port: u32) -> io::Result<VsockStream> {
    VsockStream::connect(HOST_CID, port).await
}

/// A connected stream of either transport.
#[derive(Debug)]
pub enum Connection {
    /// A unix socket: hybrid vsock on the host, or host mode.
    Unix(UnixStream),
    /// An `AF_VSOCK` socket.
    Vsock(VsockStream),
}

impl Connection {
    /// The socket, for code that drives it itself. Non-blocking.
    pub fn into_fd(self) -> io::Result<OwnedFd> {
        match self {
            Connection::Unix(s) => Ok(s.into_std()?.into()),
            Connection::Vsock(s) => Ok(s.into_fd()),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Connection::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
            Connection::Vsock($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// How the host reaches the guest's vsock ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestTransport {
    /// Kernel vhost-vsock: dial `AF_VSOCK` at this guest CID.
    Vhost {
        /// The guest's CID.
        cid: u32,
    },
    /// Hybrid vsock: dial this unix socket and send `CONNECT <port>`.
    Hybrid {
        /// The backend's host-side unix socket.
        uds_path: PathBuf,
    },
}

impl GuestTransport {
    /// Connects to guest port `port`, retrying until the guest listens or
    /// `timeout` passes.
    pub async fn connect(&self, port: u32, timeout: Duration) -> Result<Connection, VsockError> {
        match self {
            GuestTransport::Hybrid { uds_path } => connect_hybrid(uds_path, port, timeout)
                .await
                .map(Connection::Unix),
            GuestTransport::Vhost { cid } => connect_vhost(*cid, port, timeout)
                .await
                .map(Connection::Vsock),
        }
    }

    /// Where the guest's connections to host port `port` arrive (hybrid
    /// vsock: `<uds>_<port>`, where vhost-device-vsock forwards them).
    /// `None` for kernel vhost-vsock, where the host listens with
    /// `AF_VSOCK` instead.
    pub fn host_listener_path(&self, port: u32) -> Option<PathBuf> {
        match self {
            GuestTransport::Hybrid { uds_path } => Some(forwarded_path(uds_path, port)),
            GuestTransport::Vhost { .. } => None,
        }
    }
}

/// `<uds>_<port>`: where vhost-device-vsock forwards the guest's connections
/// to host port `port`.
pub fn forwarded_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut p = uds_path.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

async fn connect_vhost(cid: u32, port: u32, timeout: Duration) -> Result<VsockStream, VsockError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_secs(1), VsockStream::connect(cid, port)).await
        {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(VsockError::ConnectTimeout { port, timeout });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connects to guest port `port` through a hybrid vsock unix socket,
/// retrying until the guest listens or `timeout` passes. Returns the stream
/// positioned right after the handshake.
///
/// An attempt is retried only when the backend closed it (the guest does not
/// listen on the port yet). One that is merely unanswered is waited for until
/// `timeout`: when the guest's answer finds the connection closed,
/// vhost-device-vsock (0.3.0) panics in its vring thread (EPIPE on its
/// write), and the VM has no vsock from then on. A request sent before the
/// guest's vsock driver is up can stay unanswered for good, which is why
/// hosts connect only after the agent's readiness call (`docs/boot.md`).
pub async fn connect_hybrid(
    uds_path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, VsockError> {
    let deadline = Instant::now() + timeout;
    loop {
        // The whole deadline, never less (see above).
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, try_connect_hybrid(uds_path, port)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(Attempt::Fatal(e))) => return Err(e),
            Ok(Err(Attempt::Retry)) => {}
            Err(_elapsed) => return Err(VsockError::ConnectTimeout { port, timeout }),
        }
        if Instant::now() >= deadline {
            return Err(VsockError::ConnectTimeout { port, timeout });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

enum Attempt {
    Retry,
    Fatal(VsockError),
}

async fn try_connect_hybrid(uds_path: &Path, port: u32) -> Result<UnixStream, Attempt> {
    let mut s = UnixStream::connect(uds_path)
        .await
        .map_err(|_| Attempt::Retry)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|_| Attempt::Retry)?;
    // Guest not listening yet: the backend closes the connection.
    let line = match read_line(&mut s).await {
        Ok(Some(line)) => line,
        Ok(None) | Err(_) => return Err(Attempt::Retry),
    };
    if line.starts_with("OK ") {
        Ok(s)
    } else {
        Err(Attempt::Fatal(VsockError::Handshake(line)))
    }
}

/// Reads one `\n`-terminated line of at most 128 bytes, one byte at a time
/// (what follows the newline belongs to the caller's protocol). `None` when
/// the stream ends first; a longer line is returned cut at the limit.
pub async fn read_line<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<String>> {
    let mut line = Vec::with_capacity(32);
    loop {
        let mut b = [0u8; 1];
        if r.read(&mut b).await? == 0 {
            return Ok(None);
        }
        if b[0] == b'\n' || line.len() >= MAX_LINE {
            break;
        }
        line.push(b[0]);
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// The line the agent writes on its readiness connection.
pub fn ready_line(version: &str) -> String {
    format!("{READY_LINE_PREFIX}{version}\n")
}

/// The agent version in a readiness line (without its newline), if it is
/// one.
pub fn parse_ready_line(line: &str) -> Option<&str> {
    line.strip_prefix(READY_LINE_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake backend's listening socket, in a directory removed on drop.
    fn backend_socket() -> (tempfile::TempDir, std::path::PathBuf, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        (dir, path, listener)
    }

    /// A stand-in backend that refuses the first attempts (guest not listening
    /// yet), then answers OK and passes data through.
    #[tokio::test]
    async fn handshake_retries_until_ok_and_keeps_following_bytes() {
        let (_dir, path, listener) = backend_socket();
        tokio::spawn(async move {
            for attempt in 0.. {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 13];
                s.read_exact(&mut buf).await.unwrap();
                assert_eq!(&buf, b"CONNECT 1024\n");
                if attempt < 2 {
                    continue; // drop: as the backend does when the guest resets
                }
                s.write_all(b"OK 1073741824\nhello").await.unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
                break;
            }
        });
        let t = GuestTransport::Hybrid { uds_path: path };
        let mut s = t.connect(1024, Duration::from_secs(5)).await.unwrap();
        assert!(matches!(s, Connection::Unix(_)));
        let mut rest = [0u8; 5];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"hello");
    }

    /// A slow answer is waited for on the same connection: closing it
    /// before the guest's answer arrives makes vhost-device-vsock panic in
    /// its vring thread (EPIPE), which leaves the VM without vsock.
    #[tokio::test]
    async fn a_slow_answer_is_awaited_on_the_same_connection() {
        let (_dir, path, listener) = backend_socket();
        let backend = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            s.write_all(b"OK 5\n").await.unwrap();
            // A second connection would be an abandoned first one.
            tokio::time::timeout(Duration::from_millis(500), listener.accept())
                .await
                .is_err()
        });
        connect_hybrid(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(backend.await.unwrap(), "the first connection was abandoned");
    }

    /// A backend that never answers fails the caller at its deadline.
    #[tokio::test]
    async fn an_unanswered_connect_fails_at_its_deadline() {
        let (_dir, path, listener) = backend_socket();
        tokio::spawn(async move {
            let (_silent, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let t = Instant::now();
        let e = connect_hybrid(&path, 1024, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(
            matches!(e, VsockError::ConnectTimeout { port: 1024, .. }),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn bad_reply_is_an_error_naming_it() {
        let (_dir, path, listener) = backend_socket();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(b"NOPE\n").await.unwrap();
        });
        let e = connect_hybrid(&path, 1024, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(
            matches!(e, VsockError::Handshake(ref r) if r == "NOPE"),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn times_out_when_nothing_listens() {
        let dir = tempfile::tempdir().unwrap();
        let e = connect_hybrid(&dir.path().join("absent"), 1024, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(e, VsockError::ConnectTimeout { port: 1024, .. }));
    }

    #[test]
    fn ready_lines_and_forwarded_paths() {
        let line = ready_line("0.1.0");
        assert_eq!(line, "READY 0.1.0\n");
        assert_eq!(parse_ready_line(line.trim_end()), Some("0.1.0"));
        assert_eq!(parse_ready_line("HELLO"), None);
        assert_eq!(
            forwarded_path(Path::new("/run/veil/p/vsock.sock"), 1026),
            PathBuf::from("/run/veil/p/vsock.sock_1026")
        );
        assert_eq!(
            GuestTransport::Vhost { cid: 3 }.host_listener_path(1026),
            None
        );
    }

    #[tokio::test]
    async fn a_line_is_bounded_and_the_rest_stays_in_the_stream() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[b'x'; 300]).await.unwrap();
        drop(a);
        let l = read_line(&mut b).await.unwrap().unwrap();
        assert_eq!(l.len(), 128);
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"OK 1\nrest").await.unwrap();
        assert_eq!(read_line(&mut b).await.unwrap().as_deref(), Some("OK 1"));
        let mut rest = [0u8; 4];
        b.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"rest");
    }
}
