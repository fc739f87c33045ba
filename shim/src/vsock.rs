//! Host side of the guest's vsock: what the shim runs and owns so that the
//! guest has one — a guest CID on `/dev/vhost-vsock`, or a `vhost-device-vsock`
//! backend (hybrid vsock) — and the listener for the agent's readiness call.
//!
//! Dialling guest ports (both transports, the hybrid handshake) and the
//! readiness line are shared with the agent: `veil_protocol::vsock`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};
use veil_common::{Classify, Kind};

use tokio::net::UnixStream;
use veil_protocol::vsock::{forwarded_path, parse_ready_line, read_line};

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
    /// `/dev/vhost-vsock` could not be opened or configured.
    #[error("cannot {what} /dev/vhost-vsock")]
    VhostDevice {
        /// What failed.
        what: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The backend's jail could not be prepared.
    #[error("jailing the vsock backend")]
    Jail(#[source] crate::jail::JailError),
    /// Every candidate guest CID is taken.
    #[error("no free guest CID between {first} and {last}")]
    NoFreeCid {
        /// First CID tried.
        first: u32,
        /// Last CID tried.
        last: u32,
    },
}

impl Classify for VsockError {
    fn kind(&self) -> Kind {
        match self {
            VsockError::Spawn(e) => e.kind(),
            VsockError::Jail(e) => e.kind(),
            VsockError::BackendNotReady { .. } | VsockError::VhostDevice { .. } => Kind::Internal,
            VsockError::NoFreeCid { .. } => Kind::ResourceExhausted,
        }
    }
}

/// True when the kernel's vhost-vsock device is available.
pub fn vhost_available() -> bool {
    Path::new(VHOST_VSOCK).exists()
}

const VHOST_VSOCK: &str = "/dev/vhost-vsock";
/// The backend's per-connection buffer for guest-to-host data that the host
/// side has not read yet (its default is 64 KiB); the guest's stream sockets
/// advertise the same (see the constant's text for why).
const TX_BUFFER: u64 = veil_protocol::vsock::STREAM_BUFFER_BYTES;

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
    /// Starts the backend for a guest with CID `guest_cid`, with its log in
    /// `dir` and its sockets in `socket_dir`, and waits until it listens on
    /// its vhost-user socket.
    ///
    /// Jailed (`opts.jail`), it runs as the pod's uid, which must own
    /// `socket_dir`, and — where the kernel has Landlock — may write only
    /// below `socket_dir`: it creates its two sockets there and opens no other
    /// file by name.
    ///
    /// Listening, not merely existing: the path appears at `bind`, a moment
    /// before `listen`, and a QEMU that connects in between is refused and
    /// exits. Connecting to test it is no option either: the backend takes the
    /// first connection as its VM's.
    pub fn start(
        binary: &Path,
        dir: &Path,
        socket_dir: &Path,
        guest_cid: u32,
        mut opts: SpawnOptions,
    ) -> Result<Self, VsockError> {
        let vhost_socket = socket_dir.join("vhost-vsock.sock");
        let uds_path = socket_dir.join("vsock.sock");
        let log = dir.join("vhost-device-vsock.log");
        let mut cmd = Command::new(binary);
        cmd.arg("--vm").arg(format!(
            "guest-cid={guest_cid},socket={},uds-path={},tx-buffer-size={TX_BUFFER}",
            vhost_socket.display(),
            uds_path.display()
        ));
        if opts.jail.is_some() && opts.write_only_below.is_none() {
            if crate::jail::landlock_abi() > 0 {
                opts.write_only_below = Some(
                    crate::jail::WriteOnlyBelow::new(&[socket_dir]).map_err(VsockError::Jail)?,
                );
            } else {
                tracing::info!(
                    "the kernel has no Landlock: the vsock backend is confined by its uid alone"
                );
            }
        }
        let mut process = ManagedChild::spawn("vhost-device-vsock", cmd, &log, opts)
            .map_err(VsockError::Spawn)?;
        let timeout = crate::patience::scaled(Duration::from_secs(10));
        if !wait_listening(&mut process, &vhost_socket, timeout) {
            return Err(VsockError::BackendNotReady {
                path: vhost_socket,
                timeout,
                log,
            });
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

    /// Whether the backend still runs (reaps it once it exited).
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
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

/// Waits up to `timeout` until the daemon `process` listens on `socket`;
/// false if it did not, or exited first.
pub(crate) fn wait_listening(process: &mut ManagedChild, socket: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !unix_socket_listening(socket) {
        if Instant::now() > deadline || !process.is_running() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

/// `__SO_ACCEPTCON` in `/proc/net/unix`'s flags: the socket listens.
const SO_ACCEPTCON: u32 = 0x1_0000;

/// Whether a unix socket bound to `path` listens, from `/proc/net/unix` (this
/// network namespace's sockets: `Num RefCount Protocol Flags Type St Inode
/// Path`). Without that table, whether the path exists.
pub(crate) fn unix_socket_listening(path: &Path) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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

impl Classify for ReadyError {
    fn kind(&self) -> Kind {
        match self {
            ReadyError::Bind { .. } | ReadyError::Io(_) | ReadyError::BadLine(_) => Kind::Internal,
            ReadyError::Timeout(_) => Kind::DeadlineExceeded,
        }
    }
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
        let path = forwarded_path(uds_path, veil_protocol::AGENT_READY_VSOCK_PORT);
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

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
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
            let line = read_line(&mut conn)
                .await
                .map_err(ReadyError::Io)?
                .unwrap_or_default();
            match parse_ready_line(&line) {
                Some(version) => Ok(AgentReady {
                    version: version.to_string(),
                    connection: conn,
                }),
                None => Err(ReadyError::BadLine(line)),
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
    use tokio::io::AsyncWriteExt;

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
