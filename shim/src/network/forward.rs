//! CRI PortForward for veil pods. containerd's CRI plugin serves
//! PortForward by dialling `localhost:PORT` inside the pod's network
//! namespace; for a veil pod nothing listens there (the pod's sockets are in
//! the VM). So the shim puts a listener on `127.0.0.1` of that namespace and
//! an iptables `nat OUTPUT` rule redirecting every other localhost TCP port
//! to it; for each connection it reads the port asked for
//! (`SO_ORIGINAL_DST`) and relays the bytes over a `PORT_FORWARD` vsock
//! stream to the agent, which connects to that port on the guest's
//! localhost.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};
use veil_protocol::vsock::GuestTransport;

use super::NetworkError;

/// The listener and the redirect rule in a pod's namespace.
#[derive(Debug)]
pub struct PortForward {
    /// The listener's port on the namespace's 127.0.0.1.
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

/// The iptables arguments of the redirect rule to `port` (`-A` / `-D`).
fn rule(op: &str, port: u16) -> Vec<String> {
    let p = port.to_string();
    [
        "-w",
        "5",
        "-t",
        "nat",
        op,
        "OUTPUT",
        "-o",
        "lo",
        "-d",
        "127.0.0.1/32",
        "-p",
        "tcp",
        "!",
        "--dport",
        &p,
        "-j",
        "REDIRECT",
        "--to-ports",
        &p,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs iptables with `args` (in the calling thread's network namespace).
pub(super) fn iptables(args: &[String]) -> Result<(), NetworkError> {
    let out = Command::new("iptables").args(args).output().map_err(|e| {
        NetworkError::Unsupported(format!(
            "cannot run iptables (needed for port-forward to veil pods): {e}"
        ))
    })?;
    if !out.status.success() {
        return Err(NetworkError::Unsupported(format!(
            "iptables {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The removal of the redirect rule to `port` (for [`super::PodNetwork`]'s
/// teardown, run inside the namespace).
pub(super) fn remove_rule(port: u16) -> Result<(), NetworkError> {
    iptables(&rule("-D", port))
}

/// Binds the listener and adds the rule inside `netns` (on a thread of its
/// own, like the rest of the namespace's set-up).
fn listen_in(netns: PathBuf) -> Result<std::net::TcpListener, NetworkError> {
    let enter = |source| NetworkError::Enter {
        path: netns.clone(),
        source,
    };
    let ns = std::fs::File::open(&netns).map_err(enter)?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| enter(std::io::Error::from(e)))?;
    // A socket stays in the namespace it was made in, whatever thread uses it.
    let l = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).map_err(enter)?;
    l.set_nonblocking(true).map_err(enter)?;
    let port = l.local_addr().map_err(enter)?.port();
    iptables(&rule("-A", port))?;
    Ok(l)
}

impl PortForward {
    /// Starts forwarding localhost connections of `netns` to the guest
    /// reached through `transport`.
    pub async fn start(netns: &Path, transport: GuestTransport) -> Result<Self, NetworkError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let path = netns.to_path_buf();
        std::thread::Builder::new()
            .name("veil-netns".into())
            .spawn(move || {
                let _ = tx.send(listen_in(path));
            })
            .map_err(|_| NetworkError::Thread)?;
        let std_listener = rx.await.map_err(|_| NetworkError::Thread)??;
        let port = std_listener
            .local_addr()
            .map_err(|source| NetworkError::Enter {
                path: netns.to_path_buf(),
                source,
            })?
            .port();
        let listener = match TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(source) => {
                let _ = in_thread(netns.to_path_buf(), move || remove_rule(port));
                return Err(NetworkError::Enter {
                    path: netns.to_path_buf(),
                    source,
                });
            }
        };
        let task = tokio::spawn(serve(listener, transport));
        Ok(PortForward { port, task })
    }

    /// Stops accepting (connections already relayed end with the VM or
    /// their peer). The rule goes with [`super::PodNetwork::teardown`].
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// Runs `f` on a new thread inside `netns` and waits for it.
fn in_thread<F>(netns: PathBuf, f: F) -> Result<(), NetworkError>
where
    F: FnOnce() -> Result<(), NetworkError> + Send + 'static,
{
    std::thread::Builder::new()
        .name("veil-netns".into())
        .spawn(move || {
            let ns = std::fs::File::open(&netns).map_err(|source| NetworkError::Enter {
                path: netns.clone(),
                source,
            })?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetworkError::Enter {
                    path: netns.clone(),
                    source: e.into(),
                }
            })?;
            f()
        })
        .map_err(|_| NetworkError::Thread)?
        .join()
        .map_err(|_| NetworkError::Thread)?
}

async fn serve(listener: TcpListener, transport: GuestTransport) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(relay(s, transport.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "port-forward accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// The port the connection was made to before the redirect.
fn original_port(s: &TcpStream) -> std::io::Result<u16> {
    let a = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::OriginalDst)?;
    Ok(u16::from_be(a.sin_port))
}

async fn relay(mut s: TcpStream, transport: GuestTransport) {
    let port = match original_port(&s) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "port-forward: no original destination");
            return;
        }
    };
    let mut conn = match crate::agent::connect_port(
        &transport,
        veil_protocol::STREAM_VSOCK_PORT,
        Duration::from_secs(10),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %veil_common::error_chain(&e), port, "port-forward: agent unreachable");
            return;
        }
    };
    if let Err(e) = veil_protocol::stream::open_port_forward(&mut conn, port).await {
        tracing::info!(error = %veil_common::error_chain(&e), port, "port-forward refused");
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut s, &mut conn).await {
        tracing::debug!(error = %e, port, "port-forward connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_redirects_every_other_localhost_port() {
        assert_eq!(
            rule("-A", 41234).join(" "),
            "-w 5 -t nat -A OUTPUT -o lo -d 127.0.0.1/32 -p tcp ! --dport 41234 -j REDIRECT --to-ports 41234"
        );
    }
}
