//! The shim's process life as containerd expects it: `start` (find or launch
//! the pod's shim, print its address), serving the task API, and `delete`
//! (clean up after a shim that is gone).
//!
//! One shim per pod: `start` derives the socket address from containerd's
//! address, the namespace and the pod id (the `io.kubernetes.cri.sandbox-id`
//! annotation, or the container id without CRI). If a shim already serves
//! that address, `start` prints it and exits; otherwise it binds the socket
//! and re-executes itself as the daemon, handing over the listener as fd 3.

use std::{
    io::{Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd},
        unix::{fs::OpenOptionsExt, net::UnixListener, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::SystemTime,
};

use containerd_shim_protos::{
    api::DeleteResponse,
    protobuf::{well_known_types::timestamp::Timestamp, Message, MessageField},
};
use sha2::{Digest, Sha256};

use crate::{
    args::Args,
    config::ConfigSource,
    events::Publisher,
    phases::{self, START_ENV},
    rootfs::ImageStore,
    sandbox::VmLauncher,
    spec::HostSpec,
    state::PodDir,
    task::{
        server::{SandboxServer, TaskServer},
        ServiceContext, TaskService,
    },
};

/// Where containerd (1.6 and 2.x) expects shim sockets.
pub const SOCKET_DIR: &str = "/run/containerd/s";

/// The fd on which the daemon inherits its listening socket.
const LISTENER_FD: RawFd = 3;

/// Errors of the shim's process life.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// A file or socket operation failed.
    #[error("cannot {what} {path}")]
    Io {
        /// What.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The bundle's spec.
    #[error("reading the bundle")]
    Spec(#[from] crate::spec::SpecError),
    /// The ttrpc server.
    #[error("ttrpc server")]
    Ttrpc(#[from] ttrpc::Error),
    /// An environment variable containerd sets is missing.
    #[error("{0} is not set (is this shim run by containerd?)")]
    Env(&'static str),
    /// Encoding the delete response.
    #[error("encoding the response")]
    Encode(#[from] protobuf::Error),
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> BootstrapError + 'a {
    move |source| BootstrapError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The socket address of the pod `group` under containerd `address` and
/// `namespace`, as containerd's own shims derive it.
pub fn socket_address(address: &str, namespace: &str, group: &str) -> String {
    let joined = Path::new(address).join(namespace).join(group);
    let digest = Sha256::digest(joined.as_os_str().as_encoded_bytes());
    format!("unix://{SOCKET_DIR}/{}", hex::encode(digest))
}

fn socket_path(address: &str) -> PathBuf {
    PathBuf::from(address.strip_prefix("unix://").unwrap_or(address))
}

fn bundle_dir(args: &Args) -> Result<PathBuf, BootstrapError> {
    if !args.bundle.is_empty() {
        return Ok(PathBuf::from(&args.bundle));
    }
    std::env::current_dir().map_err(io_err("read", Path::new(".")))
}

/// `start`: prints the address of the pod's shim, launching it if needed.
pub fn start(args: &Args) -> Result<(), BootstrapError> {
    let started = phases::now_ns();
    // containerd writes the runtime options to stdin; the task Create carries
    // them too, so they are only drained here.
    let mut opts = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut opts);
    let bundle = bundle_dir(args)?;
    let spec = HostSpec::read(&bundle)?;
    let group = spec.sandbox_id(&args.id).to_string();
    let address = socket_address(&args.address, &args.namespace, &group);
    let path = socket_path(&address);
    std::fs::create_dir_all(SOCKET_DIR).map_err(io_err("create", Path::new(SOCKET_DIR)))?;

    let listener = loop {
        match UnixListener::bind(&path) {
            Ok(l) => break Some(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    break None; // the pod's shim is already serving
                }
                std::fs::remove_file(&path).map_err(io_err("remove stale", &path))?;
            }
            Err(e) => return Err(io_err("bind", &path)(e)),
        }
    };
    if let Some(listener) = listener {
        let exe = std::env::current_exe().map_err(io_err("find", Path::new("/proc/self/exe")))?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "-namespace",
            &args.namespace,
            "-id",
            &args.id,
            "-address",
            &args.address,
            "-publish-binary",
            &args.publish_binary,
            "-socket",
            &address,
        ]);
        if args.debug {
            cmd.arg("-debug");
        }
        cmd.current_dir(&bundle)
            .env(START_ENV, started.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let fd = listener.as_raw_fd();
        // SAFETY: runs between fork and exec; setsid(2), dup2(2) and fcntl(2)
        // are async-signal-safe, and `fd` is the open listener owned by this
        // process until after the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // dup2 onto itself would keep close-on-exec: clear it instead.
                let ok = if fd == LISTENER_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0) >= 0
                } else {
                    libc::dup2(fd, LISTENER_FD) >= 0
                };
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn()
            .map_err(io_err("spawn the shim daemon for", &bundle))?;
    }
    let addr_file = bundle.join("address");
    std::fs::write(&addr_file, &address).map_err(io_err("write", &addr_file))?;
    let mut out = std::io::stdout();
    out.write_all(address.as_bytes())
        .and_then(|()| out.flush())
        .map_err(io_err("write", Path::new("stdout")))?;
    Ok(())
}

/// Opens containerd's `log` FIFO in the bundle for the shim's logs. containerd
/// holds the read side; without a reader, logs go nowhere.
fn open_log(bundle: &Path) -> Option<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(bundle.join("log"))
        .ok()?;
    // Blocking writes from here on: a full FIFO slows logging, never drops it.
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on an fd we own, with valid commands and flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Some(f)
}

/// Sets up logging to containerd's log FIFO (at `debug` with `-debug`).
pub fn init_logging(args: &Args) {
    let level = if args.debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::new(format!(
        "veil_shim={level},containerd_shim_veil_v2={level},warn"
    ));
    let dir = bundle_dir(args).ok();
    let log = dir.as_deref().and_then(open_log);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    let _ = match log {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        None => builder.with_writer(std::io::sink).try_init(),
    };
}

/// Serves the task API and the sandbox API on the inherited listener until
/// `Shutdown`/`ShutdownSandbox` (or SIGTERM).
pub async fn serve(args: &Args) -> Result<(), BootstrapError> {
    let ttrpc_address =
        std::env::var("TTRPC_ADDRESS").map_err(|_| BootstrapError::Env("TTRPC_ADDRESS"))?;
    let start_cmd_ns = std::env::var(START_ENV).ok().and_then(|v| v.parse().ok());
    let publisher = Publisher::start(ttrpc_address, args.namespace.clone());
    let service = Arc::new(TaskService::new(
        ServiceContext {
            namespace: args.namespace.clone(),
            shim_pid: std::process::id(),
            events: Arc::new(publisher),
            start_cmd_ns,
        },
        Arc::new(VmLauncher),
    ));
    // SAFETY: `start` passed the listening socket as fd 3; nothing else in
    // this process owns it.
    let listener = unsafe { UnixListener::from_raw_fd(LISTENER_FD) };
    // `start` cleared close-on-exec to hand the socket over; set it back, or
    // QEMU and the vsock backend inherit it and keep the pod's address alive
    // after this shim dies (and `delete` would take it for a live shim).
    nix::fcntl::fcntl(
        listener.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| io_err("set close-on-exec on", Path::new("fd 3"))(e.into()))?;
    let task =
        containerd_shim_protos::shim_async::create_task(Arc::new(TaskServer(service.clone())));
    let sandbox = containerd_shim_protos::sandbox_async::create_sandbox(Arc::new(SandboxServer(
        service.clone(),
    )));
    let mut server = ttrpc::asynchronous::Server::new()
        .add_listener(listener.into_raw_fd())?
        .set_domain_unix()
        .register_service(task)
        .register_service(sandbox);
    server.start().await?;
    service.set_serving(phases::now_ns());
    tracing::info!(id = %args.id, pid = std::process::id(), "shim serving");

    let mut exit = service.exit_signal();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_err("handle", Path::new("SIGTERM")))?;
    tokio::select! {
        _ = exit.wait_for(|e| *e) => {}
        _ = term.recv() => tracing::info!("SIGTERM: stopping the pod VM"),
    }
    service.stop_pod().await;
    // The reply to Shutdown/ShutdownSandbox is written by the connection's
    // own task: give it a moment before the server closes the connections
    // (a sandbox that was stopped already has no teardown to wait for, and
    // the server's shutdown would cut the reply off).
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // Bound the server's own shutdown, which waits for containerd's
    // connections.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), server.shutdown()).await;
    let _ = std::fs::remove_file(socket_path(&args.socket));
    tracing::info!("shim exiting");
    Ok(())
}

/// Whether a live shim listens on `socket`. A connection alone does not
/// tell: a child that inherited the listening socket keeps it accepting
/// connections after the shim died. The socket's credentials name the
/// process that listened; it must still be alive.
fn shim_alive(socket: &Path) -> bool {
    let Ok(conn) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    match nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials) {
        // A running (not zombie) process has a start time.
        Ok(cred) => u32::try_from(cred.pid())
            .ok()
            .and_then(crate::state::start_time)
            .is_some(),
        // Cannot tell: assume it lives (never clean up under a live shim).
        Err(_) => true,
    }
}

/// `delete`: cleans up after a shim that is gone (or never fully started) —
/// the pod VM's processes, mounts and directory, the pod's image references,
/// a stale socket — and prints the `DeleteResponse`.
pub fn delete(args: &Args) -> Result<(), BootstrapError> {
    let bundle = bundle_dir(args)?;
    let source = ConfigSource::from_bundle(&bundle);
    let config = source.load().map(|(c, _)| c).unwrap_or_default();
    let group = HostSpec::read(&bundle)
        .map(|s| s.sandbox_id(&args.id).to_string())
        .unwrap_or_else(|_| args.id.clone());
    let address = socket_address(&args.address, &args.namespace, &group);
    let alive = shim_alive(&socket_path(&address));
    if group == args.id && !alive {
        if let Ok(dir) = PodDir::at(&config.state_dir, &group) {
            dir.cleanup();
        }
        // Drops the pod's references (the images stay cached) and collects
        // the cache; the format only matters for building.
        let store = ImageStore::new(&config, Default::default());
        if let Err(e) = store.release_holder(&group) {
            eprintln!(
                "veil: releasing images of {group}: {}",
                crate::error_chain(&e)
            );
        }
        let _ = std::fs::remove_file(socket_path(&address));
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let resp = DeleteResponse {
        pid: 0,
        exit_status: 128 + 9,
        exited_at: MessageField::some(Timestamp {
            seconds: i64::try_from(now.as_secs()).unwrap_or(0),
            nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
            ..Default::default()
        }),
        ..Default::default()
    };
    let bytes = resp.write_to_bytes()?;
    std::io::stdout()
        .write_all(&bytes)
        .map_err(io_err("write", Path::new("stdout")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_address_is_containerds_derivation() {
        // sha256("/run/containerd/containerd.sock/default/c1")
        let a = socket_address("/run/containerd/containerd.sock", "default", "c1");
        let want = hex::encode(Sha256::digest(
            b"/run/containerd/containerd.sock/default/c1",
        ));
        assert_eq!(a, format!("unix:///run/containerd/s/{want}"));
        assert_ne!(
            a,
            socket_address("/run/containerd/containerd.sock", "k8s.io", "c1")
        );
    }
}
