//! Host side of the guest's vsock: the transport the shim uses to reach the agent.
//!
//! Two transports exist (see DESIGN.md). Kernel vhost-vsock (`/dev/vhost-vsock`)
//! lets the host dial `AF_VSOCK` directly. Hybrid vsock, used where that device is
//! missing, runs `vhost-device-vsock` as a vhost-user backend for QEMU; the host
//! then reaches guest port P by connecting to the backend's unix socket and
//! sending `CONNECT P\n`, to which the backend answers `OK <host port>\n`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};

use crate::process::{ManagedChild, ProcessError, SpawnOptions};

/// Errors of the vsock transport.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The backend process could not be started.
    #[error("cannot start the vsock backend")]
    Spawn(#[source] ProcessError),
    /// The backend exited or never listened on its socket.
    #[error("vsock backend did not listen on {path} within {timeout:?} (see {log})")]
    BackendNotReady {
        /// The socket path it should have created.
        path: PathBuf,
        /// How long we waited.
        timeout: Duration,
        /// Its log file.
        log: PathBuf,
    },
    /// Nothing accepted the connection on the guest port in time.
    #[error("guest vsock port {port} did not accept a connection within {timeout:?}")]
    ConnectTimeout {
        /// Guest port.
        port: u32,
        /// How long we tried.
        timeout: Duration,
    },
    /// The backend answered the handshake with something else than `OK`.
    #[error("bad hybrid vsock handshake reply {0:?}")]
    Handshake(String),
    /// `/dev/vhost-vsock` could not be opened or configured.
    #[error("cannot {what} /dev/vhost-vsock")]
    VhostDevice {
        /// What failed.
        what: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Every candidate guest CID is taken.
    #[error("no free guest CID between {first} and {last}")]
    NoFreeCid {
        /// First CID tried.
        first: u32,
        /// Last CID tried.
        last: u32,
    },
}

/// How the host reaches the guest's vsock ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockTransport {
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

impl VsockTransport {
    /// Connects to guest port `port`, retrying until the guest listens or
    /// `timeout` passes.
    pub async fn connect(&self, port: u32, timeout: Duration) -> Result<UnixStream, VsockError> {
        match self {
            VsockTransport::Hybrid { uds_path } => connect_hybrid(uds_path, port, timeout).await,
            VsockTransport::Vhost { cid } => connect_vhost(*cid, port, timeout).await,
        }
    }

    /// Where the guest's connections to host port `port` arrive (hybrid vsock:
    /// `<uds>_<port>`, where vhost-device-vsock forwards them). `None` for
    /// kernel vhost-vsock, where the host listens with `AF_VSOCK` instead.
    /// Host-side services for the guest (the simulated firmware) bind here.
    pub fn host_listener_path(&self, port: u32) -> Option<PathBuf> {
        match self {
            VsockTransport::Hybrid { uds_path } => {
                let mut p = uds_path.as_os_str().to_owned();
                p.push(format!("_{port}"));
                Some(PathBuf::from(p))
            }
            VsockTransport::Vhost { .. } => None,
        }
    }
}

/// True when the kernel's vhost-vsock device is available.
pub fn vhost_available() -> bool {
    Path::new(VHOST_VSOCK).exists()
}

const VHOST_VSOCK: &str = "/dev/vhost-vsock";

mod ioctl {
    // VHOST_VSOCK_SET_GUEST_CID = _IOW(VHOST_VIRTIO, 0x60, __u64), VHOST_VIRTIO = 0xAF.
    nix::ioctl_write_ptr!(vhost_vsock_set_guest_cid, 0xAF, 0x60, u64);
}
use ioctl::vhost_vsock_set_guest_cid;

/// Claims a free guest CID on `/dev/vhost-vsock`: opens the device and sets
/// CIDs from `first` on until the kernel accepts one (a CID in use by another
/// VM gives `EADDRINUSE`). The returned descriptor holds the CID; hand it to
/// QEMU (`vhostfd=`) and keep it open until QEMU has started.
pub fn allocate_cid(first: u32, count: u32) -> Result<(u32, std::fs::File), VsockError> {
    use std::os::fd::AsRawFd;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(VHOST_VSOCK)
        .map_err(|source| VsockError::VhostDevice {
            what: "open",
            source,
        })?;
    let first = first.max(3);
    let last = first.saturating_add(count.saturating_sub(1));
    for cid in first..=last {
        let value = u64::from(cid);
        // SAFETY: `dev` is an open vhost-vsock descriptor and `value` outlives
        // the call; the ioctl only reads the u64 it points to.
        match unsafe { vhost_vsock_set_guest_cid(dev.as_raw_fd(), &value) } {
            Ok(_) => return Ok((cid, dev)),
            Err(nix::errno::Errno::EADDRINUSE) => continue,
            Err(e) => {
                return Err(VsockError::VhostDevice {
                    what: "set the guest CID on",
                    source: e.into(),
                })
            }
        }
    }
    Err(VsockError::NoFreeCid { first, last })
}

/// Connects to `cid:port` over `AF_VSOCK`, retrying until `timeout`.
async fn connect_vhost(cid: u32, port: u32, timeout: Duration) -> Result<UnixStream, VsockError> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = tokio::task::spawn_blocking(move || {
            let fd = socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            connect(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &VsockAddr::new(cid, port),
            )?;
            Ok::<_, nix::Error>(fd)
        })
        .await;
        if let Ok(Ok(fd)) = attempt {
            // SAFETY: `fd` is a connected stream socket we own; a UnixStream
            // only reads, writes, shuts down and closes it, which AF_VSOCK
            // stream sockets support like unix ones.
            let std_stream =
                unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd.into_raw_fd()) };
            let ok = std_stream
                .set_nonblocking(true)
                .and_then(|_| UnixStream::from_std(std_stream));
            if let Ok(s) = ok {
                return Ok(s);
            }
        }
        if Instant::now() >= deadline {
            return Err(VsockError::ConnectTimeout { port, timeout });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A running `vhost-device-vsock` backend for one VM.
#[derive(Debug)]
pub struct HybridVsockBackend {
    process: ManagedChild,
    /// vhost-user socket QEMU connects to.
    pub vhost_socket: PathBuf,
    /// Unix socket the host dials with `CONNECT <port>`.
    pub uds_path: PathBuf,
}

impl HybridVsockBackend {
    /// Starts the backend for a guest with CID `guest_cid`, with its sockets and
    /// log in `dir`, and waits until it listens on its vhost-user socket.
    ///
    /// Listening, not merely existing: the path appears at `bind`, a moment
    /// before `listen`, and a QEMU that connects in between is refused and
    /// exits. Connecting to test it is no option either: the backend takes the
    /// first connection as its VM's.
    pub fn start(
        binary: &Path,
        dir: &Path,
        guest_cid: u32,
        opts: SpawnOptions,
    ) -> Result<Self, VsockError> {
        let vhost_socket = dir.join("vhost-vsock.sock");
        let uds_path = dir.join("vsock.sock");
        let log = dir.join("vhost-device-vsock.log");
        let mut cmd = Command::new(binary);
        cmd.arg("--vm").arg(format!(
            "guest-cid={guest_cid},socket={},uds-path={}",
            vhost_socket.display(),
            uds_path.display()
        ));
        let mut process = ManagedChild::spawn("vhost-device-vsock", cmd, &log, opts)
            .map_err(VsockError::Spawn)?;
        let timeout = Duration::from_secs(10);
        let deadline = Instant::now() + timeout;
        while !unix_socket_listening(&vhost_socket) {
            if Instant::now() > deadline || !process.is_running() {
                return Err(VsockError::BackendNotReady {
                    path: vhost_socket,
                    timeout,
                    log,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(HybridVsockBackend {
            process,
            vhost_socket,
            uds_path,
        })
    }

    /// The backend's PID.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Stops the backend and removes its sockets.
    pub fn stop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_file(&self.vhost_socket);
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl Drop for HybridVsockBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `__SO_ACCEPTCON` in `/proc/net/unix`'s flags: the socket listens.
const SO_ACCEPTCON: u32 = 0x1_0000;

/// Whether a unix socket bound to `path` listens, from `/proc/net/unix` (this
/// network namespace's sockets: `Num RefCount Protocol Flags Type St Inode
/// Path`). Without that table, whether the path exists.
fn unix_socket_listening(path: &Path) -> bool {
    match std::fs::read_to_string("/proc/net/unix") {
        Ok(table) => listening_in(&table, path),
        Err(_) => path.exists(),
    }
}

fn listening_in(table: &str, path: &Path) -> bool {
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match (fields.get(3), fields.get(7)) {
            (Some(flags), Some(sock_path)) => {
                Path::new(sock_path) == path
                    && u32::from_str_radix(flags, 16).is_ok_and(|f| f & SO_ACCEPTCON != 0)
            }
            _ => false,
        }
    })
}

/// Connects to guest port `port` through a hybrid vsock unix socket, retrying
/// until the guest listens or `timeout` passes. Returns the stream positioned
/// right after the handshake.
///
/// Each attempt has its own deadline: a request sent before the guest's vsock
/// driver is up can stay unanswered forever, so an attempt that hears nothing
/// is abandoned and retried. The per-attempt deadline starts short (a guest that
/// is up answers in milliseconds) and doubles, so a slow but live guest is not
/// retried in a loop.
pub async fn connect_hybrid(
    uds_path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, VsockError> {
    let deadline = Instant::now() + timeout;
    let mut attempt_timeout = Duration::from_millis(200);
    loop {
        match tokio::time::timeout(attempt_timeout, try_connect_hybrid(uds_path, port)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(HandshakeAttempt::Fatal(e))) => return Err(e),
            Ok(Err(HandshakeAttempt::Retry)) => {}
            Err(_elapsed) => attempt_timeout = (attempt_timeout * 2).min(Duration::from_secs(3)),
        }
        if Instant::now() >= deadline {
            return Err(VsockError::ConnectTimeout { port, timeout });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

enum HandshakeAttempt {
    Retry,
    Fatal(VsockError),
}

async fn try_connect_hybrid(uds_path: &Path, port: u32) -> Result<UnixStream, HandshakeAttempt> {
    let mut s = UnixStream::connect(uds_path)
        .await
        .map_err(|_| HandshakeAttempt::Retry)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|_| HandshakeAttempt::Retry)?;
    // Read the reply one byte at a time: what follows the newline belongs to
    // the caller's protocol.
    let mut line = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return Err(HandshakeAttempt::Retry), // guest not listening yet
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
        }
        if line.len() > 64 {
            return Err(HandshakeAttempt::Fatal(VsockError::Handshake(
                String::from_utf8_lossy(&line).into_owned(),
            )));
        }
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    if text.starts_with("OK ") {
        Ok(s)
    } else {
        Err(HandshakeAttempt::Fatal(VsockError::Handshake(text)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A bound socket is not yet listening; `listen` makes it so.
    #[test]
    fn listening_means_listen_was_called_not_that_the_path_exists() {
        use nix::sys::socket::{
            bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backend.sock");
        assert!(!unix_socket_listening(&path));
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &UnixAddr::new(&path).unwrap(),
        )
        .unwrap();
        assert!(path.exists());
        assert!(!unix_socket_listening(&path), "bound only");
        listen(&fd, Backlog::new(1).unwrap()).unwrap();
        assert!(unix_socket_listening(&path), "listening");
        drop(fd);
        assert!(!unix_socket_listening(&path), "closed");
    }

    #[test]
    fn proc_net_unix_lines_are_read_by_flags_and_path() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 1234 /run/a.sock\n\
            0000000000000000: 00000002 00000000 00000000 0001 01 1235 /run/b.sock\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 1236\n";
        assert!(listening_in(table, Path::new("/run/a.sock")));
        assert!(!listening_in(table, Path::new("/run/b.sock")));
        assert!(!listening_in(table, Path::new("/run/c.sock")));
    }

    /// A stand-in backend that refuses the first attempts (guest not listening
    /// yet), then answers OK and passes data through.
    #[tokio::test]
    async fn handshake_retries_until_ok_and_keeps_following_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
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
        let mut s = connect_hybrid(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap();
        let mut rest = [0u8; 5];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"hello");
    }

    /// A backend that swallows the first request without answering (as when the
    /// guest driver was not up yet) must not hang the caller.
    #[tokio::test]
    async fn an_unanswered_attempt_is_abandoned_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (silent, _) = listener.accept().await.unwrap();
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(b"OK 5\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(silent);
        });
        connect_hybrid(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn bad_reply_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
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
}

/// Errors waiting for the agent's readiness call.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    /// The host-side socket for guest-initiated connections could not be bound.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The agent did not call within the deadline.
    #[error("the agent did not report ready within {0:?}")]
    Timeout(Duration),
    /// Accepting or reading the call failed.
    #[error("reading the agent's readiness call failed")]
    Io(#[source] std::io::Error),
    /// The first line was not `READY <version>`.
    #[error("unexpected readiness line {0:?}")]
    BadLine(String),
}

/// Waits for the agent's readiness call over hybrid vsock.
///
/// The agent dials host port [`veil_protocol::AGENT_READY_VSOCK_PORT`] once its
/// API serves; vhost-device-vsock forwards guest-initiated connections to host
/// port P to the unix socket `<uds path>_P`. Bind this before the VM starts, and
/// dial the agent only after [`ReadyListener::wait`] returns: a host `CONNECT`
/// sent before the guest's vsock driver is up can wedge the backend for good.
#[derive(Debug)]
pub struct ReadyListener {
    std_listener: Option<std::os::unix::net::UnixListener>,
    listener: Option<tokio::net::UnixListener>,
    path: PathBuf,
}

/// The agent's readiness call: its version and the open connection.
#[derive(Debug)]
pub struct AgentReady {
    /// The agent's version, from its `READY` line.
    pub version: String,
    /// The connection the agent keeps open (its log channel).
    pub connection: UnixStream,
}

impl ReadyListener {
    /// Binds `<uds_path>_<AGENT_READY_VSOCK_PORT>`.
    pub fn bind(uds_path: &Path) -> Result<Self, ReadyError> {
        let mut name = uds_path.as_os_str().to_owned();
        name.push(format!("_{}", veil_protocol::AGENT_READY_VSOCK_PORT));
        let path = PathBuf::from(name);
        let _ = std::fs::remove_file(&path);
        let listener =
            std::os::unix::net::UnixListener::bind(&path).map_err(|source| ReadyError::Bind {
                path: path.clone(),
                source,
            })?;
        Ok(ReadyListener {
            std_listener: Some(listener),
            listener: None,
            path,
        })
    }

    /// Waits up to `timeout` for the agent's call and its `READY` line. After a
    /// timeout the listener stays bound and can be waited on again.
    pub async fn wait(&mut self, timeout: Duration) -> Result<AgentReady, ReadyError> {
        if let Some(std_listener) = self.std_listener.take() {
            std_listener.set_nonblocking(true).map_err(ReadyError::Io)?;
            self.listener =
                Some(tokio::net::UnixListener::from_std(std_listener).map_err(ReadyError::Io)?);
        }
        let Some(listener) = self.listener.as_ref() else {
            return Err(ReadyError::Io(std::io::Error::other(
                "readiness listener is gone",
            )));
        };
        let accept_and_read = async {
            // accept() is cancel-safe: a timeout here loses no connection.
            let (mut conn, _) = listener.accept().await.map_err(ReadyError::Io)?;
            let mut line = Vec::with_capacity(32);
            loop {
                let mut b = [0u8; 1];
                if conn.read(&mut b).await.map_err(ReadyError::Io)? == 0 || b[0] == b'\n' {
                    break;
                }
                line.push(b[0]);
                if line.len() > 128 {
                    break;
                }
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            match text.strip_prefix(veil_protocol::AGENT_READY_LINE_PREFIX) {
                Some(version) => Ok(AgentReady {
                    version: version.to_string(),
                    connection: conn,
                }),
                None => Err(ReadyError::BadLine(text)),
            }
        };
        tokio::time::timeout(timeout, accept_and_read)
            .await
            .map_err(|_| ReadyError::Timeout(timeout))?
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod ready_tests {
    use super::*;

    #[tokio::test]
    async fn reads_the_ready_line_on_the_forwarded_socket() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let mut ready = ReadyListener::bind(&uds).unwrap();
        let forwarded = dir.path().join(format!(
            "vsock.sock_{}",
            veil_protocol::AGENT_READY_VSOCK_PORT
        ));
        tokio::spawn(async move {
            let mut s = UnixStream::connect(forwarded).await.unwrap();
            s.write_all(b"READY 0.1.0\nlog line\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let r = ready.wait(Duration::from_secs(5)).await.unwrap();
        assert_eq!(r.version, "0.1.0");
    }

    #[tokio::test]
    async fn a_silent_guest_times_out_and_a_wrong_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let mut ready = ReadyListener::bind(&uds).unwrap();
        let e = ready.wait(Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(e, ReadyError::Timeout(_)), "{e}");

        // Still listening after a timeout: the call is taken by the next wait.
        let forwarded = dir.path().join(format!(
            "vsock.sock_{}",
            veil_protocol::AGENT_READY_VSOCK_PORT
        ));
        tokio::spawn(async move {
            let mut s = UnixStream::connect(forwarded).await.unwrap();
            s.write_all(b"HELLO\n").await.unwrap();
        });
        let e = ready.wait(Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(e, ReadyError::BadLine(ref l) if l == "HELLO"),
            "{e}"
        );
    }
}
