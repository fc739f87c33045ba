//! stdio of a process: containerd's FIFOs (or files) on the host ⇄ the
//! agent's stream connections.
//!
//! Output streams are attached before the process starts and copied to
//! their FIFOs until EOF; the agent sends EOF only after the process's last
//! byte, so [`Relay::finish_output`] returning means every byte was delivered
//! — the exit is reported after it. stdin is copied until containerd closes
//! its end (or `CloseIO`), then the agent closes the process's stdin.

use std::{
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::{Path, PathBuf},
    pin::Pin,
};
use veil_common::{Classify, Kind};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::unix::pipe,
    task::JoinHandle,
};
use veil_protocol::agent::StreamKind;

use crate::agent::{Agent, AgentError};

/// Errors wiring stdio.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// An stdio path could not be opened.
    #[error("cannot open stdio {path}")]
    Open {
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The URI scheme is not supported (`binary://` log shippers).
    #[error("unsupported stdio URI {0} (FIFO paths and file:// are)")]
    Unsupported(String),
    /// The agent refused or lost a stream.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

impl Classify for StdioError {
    fn kind(&self) -> Kind {
        match self {
            StdioError::Open { .. } => Kind::InvalidArgument,
            StdioError::Unsupported(_) => Kind::Unimplemented,
            StdioError::Agent(e) => e.kind(),
        }
    }
}

/// containerd's stdio for one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// stdin FIFO ("" for none).
    pub stdin: String,
    /// stdout FIFO or `file://` URI ("" for none).
    pub stdout: String,
    /// stderr likewise.
    pub stderr: String,
    /// A terminal: stdout carries the terminal's output, stderr is unused.
    pub terminal: bool,
}

impl StdioPaths {
    /// Which streams the agent should expect.
    pub fn wanted(&self) -> veil_protocol::agent::Stdio {
        let mut s = veil_protocol::agent::Stdio::new();
        s.stdin = !self.stdin.is_empty();
        s.stdout = !self.stdout.is_empty() || self.terminal;
        s.stderr = !self.stderr.is_empty() && !self.terminal;
        s
    }
}

type Sink = Pin<Box<dyn AsyncWrite + Send>>;
type Source = Pin<Box<dyn AsyncRead + Send>>;

/// Opens an output destination: a FIFO (kept open for reading too, so the
/// open never blocks and never fails for a missing reader) or a file.
fn open_output(uri: &str) -> Result<Sink, StdioError> {
    let path = output_path(uri)?;
    let is_fifo = std::fs::metadata(&path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false);
    let err = |source| StdioError::Open {
        path: path.clone(),
        source,
    };
    if is_fifo {
        let tx = pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(&path)
            .map_err(err)?;
        Ok(Box::pin(tx))
    } else {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&path)
            .map_err(err)?;
        Ok(Box::pin(tokio::fs::File::from_std(f)))
    }
}

fn output_path(uri: &str) -> Result<PathBuf, StdioError> {
    if let Some(p) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(p));
    }
    if uri.contains("://") && !uri.starts_with("fifo://") {
        return Err(StdioError::Unsupported(uri.to_string()));
    }
    Ok(PathBuf::from(uri.strip_prefix("fifo://").unwrap_or(uri)))
}

/// Opens the stdin FIFO for reading, waiting (in a blocking thread) for its
/// writer; that wait is what makes EOF mean "containerd closed stdin".
async fn open_stdin(path: PathBuf) -> Result<Source, StdioError> {
    let p = path.clone();
    let file = tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&p)
    })
    .await
    .map_err(|e| StdioError::Open {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?
    .map_err(|source| StdioError::Open {
        path: path.clone(),
        source,
    })?;
    let rx = pipe::Receiver::from_file(file).map_err(|source| StdioError::Open { path, source })?;
    Ok(Box::pin(rx))
}

/// Wakes a stdin open blocked waiting for a writer (used at teardown).
fn unblock_stdin_open(path: &Path) {
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
}

/// The copy tasks of one process's stdio.
#[derive(Default)]
pub struct Relay {
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<(JoinHandle<()>, PathBuf)>,
}

impl Relay {
    /// Attaches every stream of process (`container`, `exec`) that `paths`
    /// wants. Call before starting the process.
    pub async fn attach(
        agent: &Agent,
        container: &str,
        exec: &str,
        paths: &StdioPaths,
    ) -> Result<Self, StdioError> {
        let mut relay = Relay::default();
        if paths.terminal {
            let stream = agent
                .open_stream(container, exec, StreamKind::TERMINAL)
                .await?;
            let (mut r, mut w) = tokio::io::split(stream);
            if !paths.stdout.is_empty() {
                let mut out = open_output(&paths.stdout)?;
                relay.outputs.push(tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut r, &mut out).await;
                    let _ = out.flush().await;
                }));
            }
            if !paths.stdin.is_empty() {
                let path = PathBuf::from(&paths.stdin);
                let p = path.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut input) = open_stdin(p).await {
                        let _ = tokio::io::copy(&mut input, &mut w).await;
                    }
                    // Keep the terminal's write side open (closing it would
                    // shut the connection down): the output is still flowing.
                    let _keep = w;
                    std::future::pending::<()>().await
                });
                relay.stdin = Some((task, path));
            }
            return Ok(relay);
        }
        for (uri, kind) in [
            (&paths.stdout, StreamKind::STDOUT),
            (&paths.stderr, StreamKind::STDERR),
        ] {
            if uri.is_empty() {
                continue;
            }
            let mut out = open_output(uri)?;
            let mut stream = agent.open_stream(container, exec, kind).await?;
            relay.outputs.push(tokio::spawn(async move {
                let _ = tokio::io::copy(&mut stream, &mut out).await;
                let _ = out.flush().await;
            }));
        }
        if !paths.stdin.is_empty() {
            let mut stream = agent
                .open_stream(container, exec, StreamKind::STDIN)
                .await?;
            let path = PathBuf::from(&paths.stdin);
            let p = path.clone();
            let task = tokio::spawn(async move {
                if let Ok(mut input) = open_stdin(p).await {
                    let _ = tokio::io::copy(&mut input, &mut stream).await;
                }
                // EOF: the agent closes the process's stdin.
                let _ = stream.shutdown().await;
            });
            relay.stdin = Some((task, path));
        }
        Ok(relay)
    }

    /// Waits until every output stream reached EOF (all output delivered).
    pub async fn finish_output(&mut self) {
        for t in self.outputs.drain(..) {
            let _ = t.await;
        }
    }

    /// Stops copying stdin (CloseIO, or the process is gone).
    pub fn close_stdin(&mut self) {
        if let Some((task, path)) = self.stdin.take() {
            unblock_stdin_open(&path);
            task.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.close_stdin();
        for t in &self.outputs {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_streams_follow_the_paths() {
        let p = StdioPaths {
            stdin: String::new(),
            stdout: "/f/out".into(),
            stderr: "/f/err".into(),
            terminal: false,
        };
        let w = p.wanted();
        assert_eq!((w.stdin, w.stdout, w.stderr), (false, true, true));
        let t = StdioPaths {
            stdin: "/f/in".into(),
            stdout: "/f/out".into(),
            stderr: String::new(),
            terminal: true,
        };
        let w = t.wanted();
        assert_eq!((w.stdin, w.stdout, w.stderr), (true, true, false));
    }

    #[test]
    fn output_uris() {
        assert_eq!(output_path("/run/f").unwrap(), PathBuf::from("/run/f"));
        assert_eq!(
            output_path("file:///var/log/c.log").unwrap(),
            PathBuf::from("/var/log/c.log")
        );
        assert!(matches!(
            output_path("binary:///bin/x?a=b"),
            Err(StdioError::Unsupported(_))
        ));
    }

    #[tokio::test]
    async fn stdin_open_waits_for_the_writer_and_can_be_unblocked() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("in");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let f2 = fifo.clone();
        let t = tokio::spawn(async move { open_stdin(f2).await.is_ok() });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!t.is_finished(), "open waits for a writer");
        unblock_stdin_open(&fifo);
        assert!(t.await.unwrap());
    }
}
