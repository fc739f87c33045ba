//! Async reads and writes on a file descriptor that tokio does not wrap
//! itself: an `AF_VSOCK` socket, a pipe, a pty master. Used by the vsock
//! streams here and by the agent's stdio.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    pin::Pin,
    task::{ready, Context, Poll},
};

use nix::{
    fcntl::{fcntl, FcntlArg, OFlag},
    sys::socket::{shutdown, Shutdown},
};
use tokio::io::{unix::AsyncFd, AsyncRead, AsyncWrite, ReadBuf};

/// A non-blocking fd driven by tokio's reactor.
#[derive(Debug)]
pub struct FdStream {
    fd: AsyncFd<OwnedFd>,
}

impl FdStream {
    /// Takes `fd`, making it non-blocking.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags))?;
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open
        // and names the same file for the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register(fd)? };
        Ok(FdStream { fd })
    }

    /// The reactor registration, for waiting on readiness directly.
    pub fn async_fd(&self) -> &AsyncFd<OwnedFd> {
        &self.fd
    }

    /// The descriptor back (still non-blocking).
    pub fn into_fd(self) -> OwnedFd {
        self.fd.into_inner()
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // A pty master reads EIO once every slave fd is closed: EOF.
                Ok(Err(e)) if e.raw_os_error() == Some(nix::errno::Errno::EIO as i32) => {
                    return Poll::Ready(Ok(()))
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| {
                nix::unistd::write(fd.get_ref().as_fd(), data).map_err(io::Error::from)
            }) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// A socket is shut down for writing; a pipe or pty has nothing to shut.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match shutdown(self.fd.get_ref().as_raw_fd(), Shutdown::Write) {
            Ok(()) | Err(nix::errno::Errno::ENOTSOCK) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_pipe_carries_bytes_and_ends() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut r = FdStream::new(r).unwrap();
        let mut w = FdStream::new(w).unwrap();
        w.write_all(b"hello").await.unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
    }
}
