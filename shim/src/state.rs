//! A pod's runtime directory, `<state_dir>/<sandbox-id>`: sockets, logs, the
//! PIDs of the processes the shim started and the pod's files kept elsewhere
//! (its scratch disk), so that `delete` can clean up after a shim that
//! crashed.
//!
//! A recorded PID carries the process's start time (from `/proc/PID/stat`),
//! so a PID reused by an unrelated process is never signalled.

use std::{
    fs,
    os::unix::{ffi::OsStrExt, fs::DirBuilderExt},
    path::{Path, PathBuf},
    time::Duration,
};
use veil_common::{Classify, Kind};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

/// Errors of the pod directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file operation failed.
    #[error("cannot {what} {path}")]
    Io {
        /// What.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The id would escape the state directory.
    #[error("invalid sandbox id '{0}'")]
    BadId(String),
}

impl Classify for StateError {
    fn kind(&self) -> Kind {
        match self {
            StateError::Io { .. } => Kind::Internal,
            StateError::BadId(_) => Kind::InvalidArgument,
        }
    }
}

/// `<state_dir>/<sandbox-id>`.
#[derive(Debug, Clone)]
pub struct PodDir {
    /// The directory.
    pub path: PathBuf,
}

impl PodDir {
    /// The directory of `sandbox_id` (not created).
    pub fn at(state_dir: &Path, sandbox_id: &str) -> Result<Self, StateError> {
        if !veil_common::id::is_valid_id(sandbox_id) {
            return Err(StateError::BadId(sandbox_id.to_string()));
        }
        Ok(PodDir {
            path: state_dir.join(sandbox_id),
        })
    }

    /// Creates it (mode 0700).
    pub fn create(&self) -> Result<(), StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.path)
            .map_err(|source| StateError::Io {
                what: "create",
                path: self.path.clone(),
                source,
            })
    }

    /// A file in it.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Records that the process `name` (e.g. `qemu`) is `pid`.
    pub fn record_pid(&self, name: &str, pid: u32) -> Result<(), StateError> {
        let path = self.file(&format!("{name}.pid"));
        let start = start_time(pid).unwrap_or(0);
        fs::write(&path, format!("{pid} {start}\n")).map_err(|source| StateError::Io {
            what: "write",
            path,
            source,
        })
    }

    /// Records that the pod owns file `path` outside the directory (as
    /// `<name>.file`): [`Self::cleanup`] removes it.
    pub fn record_file(&self, name: &str, path: &Path) -> Result<(), StateError> {
        let rec = self.file(&format!("{name}.file"));
        fs::write(&rec, path.as_os_str().as_bytes()).map_err(|source| StateError::Io {
            what: "write",
            path: rec,
            source,
        })
    }

    /// Kills every recorded process that is still the one recorded, removes
    /// the recorded files, unmounts what is mounted below the directory,
    /// removes it and ends the pod's jail uid lease ([`crate::jail`]). Used by `delete` after a crash and by the shim's own
    /// teardown; idempotent.
    pub fn cleanup(&self) {
        let Ok(entries) = fs::read_dir(&self.path) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".file") {
                if let Ok(bytes) = fs::read(e.path()) {
                    let target = Path::new(std::ffi::OsStr::from_bytes(&bytes));
                    match fs::remove_file(target) {
                        Ok(()) => {}
                        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                        Err(err) => {
                            tracing::warn!(path = %target.display(), error = %err, "cannot remove pod file")
                        }
                    }
                }
                continue;
            }
            if !name.ends_with(".pid") {
                continue;
            }
            if let Some((pid, start)) = fs::read_to_string(e.path())
                .ok()
                .as_deref()
                .and_then(parse_pid_record)
            {
                if start_time(pid) == Some(start) {
                    if let Ok(p) = i32::try_from(pid) {
                        tracing::info!(pid, file = %name, "killing leftover process");
                        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                        wait_gone(pid, start);
                    }
                }
            }
        }
        unmount_below(&self.path);
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove pod dir");
            }
        }
        // Its processes are gone: the pod's jail uid is free again.
        if let (Some(state_dir), Some(id)) = (self.path.parent(), self.path.file_name()) {
            crate::jail::release(state_dir, &id.to_string_lossy());
        }
    }
}

fn parse_pid_record(s: &str) -> Option<(u32, u64)> {
    let mut it = s.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The start time (field 22 of `/proc/PID/stat`, clock ticks since boot).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: count from its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is index 19.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn wait_gone(pid: u32, start: u64) {
    for _ in 0..200 {
        if start_time(pid) != Some(start) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Lazily unmounts every mount point below `dir` (deepest first).
fn unmount_below(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stay_one_component() {
        assert!(PodDir::at(Path::new("/run/veil"), "abc-1_2.x").is_ok());
        for bad in ["", ".", "..", "../etc", "a/b", "-x"] {
            assert!(PodDir::at(Path::new("/run/veil"), bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cleanup_kills_a_recorded_process_and_removes_the_dir() {
        let d = tempfile::tempdir().unwrap();
        let pod = PodDir::at(d.path(), "pod").unwrap();
        pod.create().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        pod.record_pid("sleeper", child.id()).unwrap();
        // A stale record for a PID whose start time does not match is left alone.
        fs::write(pod.file("stale.pid"), format!("{} 1\n", std::process::id())).unwrap();
        let outside = d.path().join("pod-scratch.img");
        fs::write(&outside, b"x").unwrap();
        pod.record_file("scratch", &outside).unwrap();
        pod.cleanup();
        assert!(child.wait().unwrap().code().is_none(), "killed by a signal");
        assert!(!pod.path.exists());
        assert!(!outside.exists(), "recorded files go with the pod");
    }
}
