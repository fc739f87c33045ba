//! Keeps a file volume in the guest in step with kubelet's directory.
//!
//! inotify (through `nix`) on the volume's directory: kubelet's atomic writer
//! ends each update by renaming `..data_tmp` over `..data` (an
//! `IN_MOVED_TO`) and then removes the old user-visible names (`IN_DELETE`).
//! On each batch of events the directory is read again and, when its version
//! or its names changed since the last push, the new state is put in the
//! guest, where `..data` is swapped the same way. No polling: the task sleeps
//! in the kernel until kubelet writes. It ends when the volume's directory
//! goes (`IN_DELETE_SELF`, `IN_IGNORED`) or when the pod releases the volume.

use std::{
    os::fd::{AsFd, AsRawFd, RawFd},
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

use super::{files, push, VolumeError};
use crate::agent::Agent;

/// inotify, readable through tokio.
struct Watch(Inotify);

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Starts watching `dir` (volume `id`, last pushed as `pushed`); pushes go
/// through `lock` so that a release waits for one in flight.
pub fn spawn(
    id: String,
    dir: PathBuf,
    agent: Agent,
    pushed: (String, Vec<String>),
    lock: Arc<tokio::sync::Mutex<()>>,
) -> Result<tokio::task::JoinHandle<()>, VolumeError> {
    let watch_err = |source| VolumeError::Watch {
        path: dir.clone(),
        source,
    };
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(watch_err)?;
    ino.add_watch(
        &dir,
        AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF,
    )
    .map_err(watch_err)?;
    // SAFETY: the Inotify owns its descriptor and is moved into the
    // AsyncFd, so the descriptor stays open and names the same inotify
    // instance for the AsyncFd's whole life; `as_raw_fd` always returns it.
    let fd = unsafe { AsyncFd::register(Watch(ino)) }.map_err(|e| {
        let e: std::io::Error = e.into();
        VolumeError::Watch {
            path: dir.clone(),
            source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    })?;
    Ok(tokio::spawn(run(id, dir, agent, pushed, lock, fd)))
}

async fn run(
    id: String,
    dir: PathBuf,
    agent: Agent,
    mut pushed: (String, Vec<String>),
    lock: Arc<tokio::sync::Mutex<()>>,
    fd: AsyncFd<Watch>,
) {
    // A change between the first read and the watch is caught here.
    let mut check = true;
    loop {
        if check {
            let _held = lock.lock().await;
            match sync_once(&id, &dir, &agent, &pushed).await {
                Ok(Some(now)) => pushed = now,
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    volume = %id, dir = %dir.display(), error = %veil_common::error_chain(&e),
                    "cannot bring the volume's update into the pod VM; retried at kubelet's next change"
                ),
            }
        }
        let mut ready = match fd.readable().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(volume = %id, error = %e, "volume watch failed; updates stop");
                return;
            }
        };
        match ready.get_inner().0.read_events() {
            Ok(events) => {
                let gone = events.iter().any(|e| {
                    e.mask.intersects(
                        AddWatchFlags::IN_DELETE_SELF
                            | AddWatchFlags::IN_MOVE_SELF
                            | AddWatchFlags::IN_IGNORED,
                    )
                });
                if gone {
                    tracing::debug!(volume = %id, "volume directory gone; watch ends");
                    return;
                }
                check = !events.is_empty();
            }
            Err(nix::Error::EAGAIN) => {
                ready.clear_ready();
                check = false;
            }
            Err(e) => {
                tracing::warn!(volume = %id, error = %e, "volume watch failed; updates stop");
                return;
            }
        }
    }
}

/// Reads the directory and pushes it when it differs from `pushed`; the new
/// state if it was pushed.
async fn sync_once(
    id: &str,
    dir: &std::path::Path,
    agent: &Agent,
    pushed: &(String, Vec<String>),
) -> Result<Option<(String, Vec<String>)>, VolumeError> {
    let started = Instant::now();
    let d = dir.to_path_buf();
    let req = tokio::task::spawn_blocking(move || files::read_atomic(&d))
        .await
        .map_err(|e| VolumeError::Layout {
            path: dir.to_path_buf(),
            reason: format!("reader task failed: {e}"),
        })??;
    let now = files::fingerprint(&req);
    if &now == pushed {
        return Ok(None);
    }
    push(agent, id, req).await?;
    tracing::info!(
        volume = %id, version = %now.0, elapsed_us = started.elapsed().as_micros() as u64,
        "volume update in the pod VM"
    );
    Ok(Some(now))
}
