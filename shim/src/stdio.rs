//! stdio of a process: containerd's FIFOs (or files) on the host ⇄ the
//! agent's stream connections.
//!
//! Output streams are attached before the process starts and copied to
//! their FIFOs until EOF. With the exit the agent reports how many bytes it
//! had written to each stream; [`Relay::finish_output`] returns once those
//! reached the FIFOs (or the stream ended), so every byte the process wrote
//! before its exit is delivered before the exit is reported — and a
//! background child still holding the stream does not hold the exit back.
//! stdin is copied until containerd closes its end (or `CloseIO`), then the
//! agent closes the process's stdin.

use std::{
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};
use veil_common::{Classify, Kind};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::unix::pipe,
    sync::watch,
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
async fn open_stdin(path: PathBuf) -> Result<pipe::Receiver, StdioError> {
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
    Ok(rx)
}

/// Wakes a stdin open blocked waiting for a writer (used at teardown).
fn unblock_stdin_open(path: &Path) {
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
}

/// How long the output relays may go without moving a byte, after the
/// exit, before the exit is reported anyway (a stream that broke).
const STALL: Duration = Duration::from_secs(2);

/// How long a relay may sit in a write to its FIFO without it moving, after
/// the exit, before the exit is reported anyway: nobody reads the FIFO (a
/// detached client, a containerd that restarted). The relay goes on.
const FIFO_STALL: Duration = Duration::from_millis(300);

/// Copy buffer of an output relay.
const RELAY_BUF: usize = 256 * 1024;

/// How far an output relay got.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// Bytes written to the FIFO or file.
    bytes: u64,
    /// The stream ended (or its destination failed).
    ended: bool,
    /// In a write to the destination that has not returned yet.
    writing: bool,
}

/// One output relay: its task and progress. `stderr` says which of the
/// agent's counts it is held to.
struct Output {
    task: JoinHandle<()>,
    progress: watch::Receiver<Progress>,
    stderr: bool,
}

/// What the agent had written per stream when it reported the exit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// stdout, or the terminal.
    pub stdout: u64,
    /// stderr.
    pub stderr: u64,
    /// The agent reported the exit with output of the process still
    /// waiting for us: relay until the stream ends, not just the counts.
    pub pending: bool,
}

/// Copies `from` into `to` until EOF, publishing progress. If `to` fails the
/// stream is still read to its end (discarding), so the process is never
/// blocked on a destination that went away.
async fn relay_output<R, W>(mut from: R, mut to: W, progress: watch::Sender<Progress>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUF];
    let mut failed = false;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if failed {
            continue;
        }
        progress.send_modify(|p| p.writing = true);
        if to.write_all(&buf[..n]).await.is_err() {
            failed = true;
            progress.send_modify(|p| {
                p.ended = true;
                p.writing = false;
            });
            continue;
        }
        progress.send_modify(|p| {
            p.bytes += n as u64;
            p.writing = false;
        });
    }
    let _ = to.flush().await;
    progress.send_modify(|p| p.ended = true);
}

fn spawn_output<R, W>(from: R, to: W, stderr: bool) -> Output
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, progress) = watch::channel(Progress::default());
    Output {
        task: tokio::spawn(relay_output(from, to, tx)),
        progress,
        stderr,
    }
}

/// The stdin copy: FIFO → the agent's stream.
struct Input {
    task: JoinHandle<()>,
    path: PathBuf,
    /// Asks the copy to take what is left in the FIFO and stop.
    finish: Option<tokio::sync::oneshot::Sender<()>>,
    /// Bytes written to the stream.
    written: Arc<AtomicU64>,
    /// The copy is over (EOF, finished, or its stream failed).
    done: Arc<AtomicBool>,
    /// A terminal's input (its count is not the process's stdin).
    terminal: bool,
}

impl Input {
    /// Copies the FIFO at `path` into `to` (see [`copy_input`]). The copy
    /// keeps `to` open once it is over, until the relay drops it: closing
    /// the stream at once could cut what is still on its way before the
    /// agent was told the count, and a terminal's connection would shut.
    fn spawn<W>(path: PathBuf, mut to: W, terminal: bool) -> Input
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (finish, finishing) = tokio::sync::oneshot::channel();
        let written = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let (count, over, p) = (Arc::clone(&written), Arc::clone(&done), path.clone());
        let task = tokio::spawn(async move {
            if let Ok(input) = open_stdin(p).await {
                copy_input(input, &mut to, finishing, &count).await;
            }
            let _ = to.flush().await;
            over.store(true, Ordering::Release);
            std::future::pending::<()>().await
        });
        Input {
            task,
            path,
            finish: Some(finish),
            written,
            done,
            terminal,
        }
    }
}

/// How long [`Relay::end_stdin`] waits for the copy to pass on what the
/// FIFO held (the process may not be reading its stdin).
const STDIN_FINISH: Duration = Duration::from_secs(5);

/// Copies `input` into `to` until EOF or `finish`; after `finish`, takes
/// only what the FIFO holds already (containerd wrote all it had before it
/// asked to close stdin), never waiting for more.
async fn copy_input<W>(
    mut input: pipe::Receiver,
    to: &mut W,
    mut finish: tokio::sync::oneshot::Receiver<()>,
    written: &AtomicU64,
) where
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut finishing = false;
    loop {
        let n = if finishing {
            match input.try_read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            }
        } else {
            tokio::select! {
                r = input.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                _ = &mut finish => {
                    finishing = true;
                    continue;
                }
            }
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        written.fetch_add(n as u64, Ordering::AcqRel);
    }
}

/// The copy tasks of one process's stdio.
#[derive(Default)]
pub struct Relay {
    outputs: Vec<Output>,
    stdin: Option<Input>,
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
            let (r, w) = tokio::io::split(stream);
            if !paths.stdout.is_empty() {
                let out = open_output(&paths.stdout)?;
                relay.outputs.push(spawn_output(r, out, false));
            }
            if !paths.stdin.is_empty() {
                // The terminal's write side stays open with the copy (closing
                // it would shut the connection down): output still flows.
                relay.stdin = Some(Input::spawn(PathBuf::from(&paths.stdin), w, true));
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
            let out = open_output(uri)?;
            let stream = agent.open_stream(container, exec, kind).await?;
            relay
                .outputs
                .push(spawn_output(stream, out, kind == StreamKind::STDERR));
        }
        if !paths.stdin.is_empty() {
            let stream = agent
                .open_stream(container, exec, StreamKind::STDIN)
                .await?;
            relay.stdin = Some(Input::spawn(PathBuf::from(&paths.stdin), stream, false));
        }
        Ok(relay)
    }

    /// Waits until every output stream delivered what the agent had sent
    /// when it reported the exit (`sent`), or — the count unknown (the agent
    /// was lost), or output left pending — until it ended. Gives up on a
    /// stream that moves nothing for [`STALL`], or whose FIFO takes nothing
    /// for [`FIFO_STALL`]; returns whether everything arrived. The relays go
    /// on copying what comes after (a background child's output).
    pub async fn finish_output(&self, sent: Option<Sent>) -> bool {
        let mut complete = true;
        for o in &self.outputs {
            let target =
                sent.filter(|s| !s.pending)
                    .map(|s| if o.stderr { s.stderr } else { s.stdout });
            if !wait_relayed(o.progress.clone(), target).await {
                complete = false;
            }
        }
        complete
    }

    /// Ends the process's stdin as containerd's CloseIO asks: what the FIFO
    /// holds is passed on, then the copy stops. Returns the bytes the stdin
    /// stream carried in all, for the agent to close stdin after them
    /// (`None`: no stdin stream, or a terminal's).
    pub async fn end_stdin(&mut self) -> Option<u64> {
        let input = self.stdin.as_mut()?;
        if let Some(finish) = input.finish.take() {
            let _ = finish.send(());
        }
        unblock_stdin_open(&input.path);
        let deadline = tokio::time::Instant::now() + STDIN_FINISH;
        while !input.done.load(Ordering::Acquire) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !input.done.load(Ordering::Acquire) {
            // The process is not reading its stdin: stop here, so the count
            // is what the stream carried.
            tracing::warn!(
                "stdin not taken within {STDIN_FINISH:?} of its close: the rest is dropped"
            );
            input.task.abort();
        }
        // Otherwise the copy stays parked holding the stream open, so
        // nothing on its way is cut; it ends with the relay.
        (!input.terminal).then(|| input.written.load(Ordering::Acquire))
    }

    /// Stops copying stdin at once (the process is gone).
    pub fn close_stdin(&mut self) {
        if let Some(input) = self.stdin.take() {
            unblock_stdin_open(&input.path);
            input.task.abort();
        }
    }
}

/// Waits for one relay to reach `target` bytes (or its end, without one);
/// false if it gave up on a stalled stream or an unread FIFO.
async fn wait_relayed(mut rx: watch::Receiver<Progress>, target: Option<u64>) -> bool {
    let mut moved_at = tokio::time::Instant::now();
    let mut bytes = rx.borrow().bytes;
    loop {
        let p = *rx.borrow_and_update();
        if p.ended || target.is_some_and(|t| p.bytes >= t) {
            return true;
        }
        if p.bytes != bytes {
            (bytes, moved_at) = (p.bytes, tokio::time::Instant::now());
        }
        let (limit, why) = if p.writing {
            (FIFO_STALL, "nobody reads the FIFO")
        } else {
            (STALL, "the stream stalled")
        };
        let left = limit.saturating_sub(moved_at.elapsed());
        if left.is_zero() {
            tracing::warn!(
                relayed = p.bytes,
                expected = ?target,
                "output incomplete at the exit ({why}): reporting the exit"
            );
            return false;
        }
        match tokio::time::timeout(left, rx.changed()).await {
            Ok(Ok(())) | Err(_) => {}
            Ok(Err(_)) => return true,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.close_stdin();
        for o in &self.outputs {
            o.task.abort();
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
    async fn an_unread_fifo_does_not_hold_the_exit() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("out");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let sink = open_output(fifo.to_str().unwrap()).unwrap();
        let (mut agent, from) = tokio::io::duplex(1024 * 1024);
        let out = spawn_output(from, sink, false);
        // More than the FIFO holds; nobody reads it.
        let writer = tokio::spawn(async move {
            let _ = agent.write_all(&vec![b'y'; 4 * 1024 * 1024]).await;
        });
        let t = std::time::Instant::now();
        let got = wait_relayed(out.progress.clone(), Some(4 * 1024 * 1024)).await;
        assert!(!got, "an unread FIFO cannot have taken everything");
        assert!(
            t.elapsed() < STALL,
            "waited {:?}: the unread FIFO was not noticed",
            t.elapsed()
        );
        writer.abort();
        out.task.abort();
    }

    #[tokio::test]
    async fn a_slow_reader_gets_everything_before_the_exit() {
        const SIZE: usize = 2 * 1024 * 1024;
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("out");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let sink = open_output(fifo.to_str().unwrap()).unwrap();
        let mut reader = pipe::OpenOptions::new().open_receiver(&fifo).unwrap();
        let (mut agent, from) = tokio::io::duplex(1024 * 1024);
        let out = spawn_output(from, sink, false);
        tokio::spawn(async move {
            let _ = agent.write_all(&vec![b'y'; SIZE]).await;
        });
        // Reads 64 KiB every 50 ms: slow, but never idle for FIFO_STALL.
        let read = tokio::spawn(async move {
            let mut n = 0;
            let mut buf = vec![0u8; 64 * 1024];
            while n < SIZE {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            n
        });
        assert!(wait_relayed(out.progress.clone(), Some(SIZE as u64)).await);
        assert_eq!(read.await.unwrap(), SIZE);
        out.task.abort();
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
