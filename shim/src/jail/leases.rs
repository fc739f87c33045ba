//! Leases of the jail ids: which pod holds which uid of the configured
//! range, as symlinks `<state_dir>/.uids/<id>` → `<pod>` changed under one
//! `flock`, so that no two pods share an id and a killed shim's id is
//! reclaimed.

use std::{
    fs,
    io::ErrorKind,
    os::unix::{ffi::OsStrExt, fs::DirBuilderExt},
    path::{Path, PathBuf},
};

use super::{io_err, JailConfig, JailError};

/// The directory of the uid leases: `<state_dir>/.uids` (a name no pod id
/// can have: ids begin with a letter or digit).
pub fn leases_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(".uids")
}

/// An exclusive `flock` on `<leases>/.lock`, released when dropped: the
/// leases are read and changed under it, so two shims never take the same id
/// and a reclaim never removes a lease just taken.
struct LeaseLock(#[allow(dead_code, reason = "held for its Drop")] nix::fcntl::Flock<fs::File>);

impl LeaseLock {
    fn take(dir: &Path) -> Result<Self, JailError> {
        let path = dir.join(".lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map(LeaseLock)
            .map_err(|(_, e)| io_err("lock", &path)(e.into()))
    }
}

/// Whether some process runs with real, effective, saved or filesystem uid
/// `uid` (from `/proc/*/status`).
pub fn uid_in_use(uid: u32) -> bool {
    let Ok(rd) = fs::read_dir("/proc") else {
        return true; // cannot tell: never reclaim
    };
    rd.flatten()
        .filter(|e| e.file_name().as_bytes().iter().all(u8::is_ascii_digit))
        .filter_map(|e| fs::read_to_string(e.path().join("status")).ok())
        .any(|s| status_has_uid(&s, uid))
}

fn status_has_uid(status: &str, uid: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .is_some_and(|ids| ids.split_whitespace().any(|v| v == uid.to_string()))
}

/// The uid leases: who holds which id of a range.
#[derive(Debug, Clone)]
pub struct Leases {
    state_dir: PathBuf,
    first: u32,
    count: u32,
    in_use: fn(u32) -> bool,
}

impl Leases {
    /// The leases of `config`'s range under `state_dir`.
    pub fn new(state_dir: &Path, config: &JailConfig) -> Result<Self, JailError> {
        let bad = JailError::BadRange {
            first: config.first_id,
            count: config.count,
        };
        if config.first_id == 0 || config.count == 0 {
            return Err(bad);
        }
        match config.first_id.checked_add(config.count - 1) {
            Some(last) if last < u32::MAX => {}
            _ => return Err(bad),
        }
        Ok(Leases {
            state_dir: state_dir.to_path_buf(),
            first: config.first_id,
            count: config.count,
            in_use: uid_in_use,
        })
    }

    fn dir(&self) -> PathBuf {
        leases_dir(&self.state_dir)
    }

    /// Every lease: (id, pod).
    fn all(&self) -> Vec<(u32, String)> {
        let Ok(rd) = fs::read_dir(self.dir()) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let id: u32 = e.file_name().to_str()?.parse().ok()?;
                let pod = fs::read_link(e.path()).ok()?;
                Some((id, pod.to_str()?.to_string()))
            })
            .collect()
    }

    /// A lease is stale when its pod's directory is gone and no process runs
    /// as its id: the pod's cleanup died between the two, or its shim was
    /// killed and `delete` never ran.
    fn stale(&self, pod: &str, id: u32) -> bool {
        !self.state_dir.join(pod).exists() && !(self.in_use)(id)
    }

    /// Leases an id to `pod` (the same one again if it holds one): a symlink
    /// `<state_dir>/.uids/<id>` → `<pod>`, created atomically. The search
    /// starts at a hash of the pod id, so concurrent pods rarely meet; a
    /// stale lease on the way is reclaimed.
    pub fn acquire(&self, pod: &str) -> Result<u32, JailError> {
        let dir = self.dir();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create", &dir))?;
        let _lock = LeaseLock::take(&dir)?;
        if let Some((id, _)) = self.all().into_iter().find(|(_, p)| p == pod) {
            return Ok(id);
        }
        let count = u64::from(self.count);
        let start = pod.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        }) % count;
        for i in 0..count {
            let offset = u32::try_from((start + i) % count).unwrap_or(0);
            let id = self.first + offset;
            let link = dir.join(id.to_string());
            match std::os::unix::fs::symlink(pod, &link) {
                Ok(()) => return Ok(id),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let holder = fs::read_link(&link).ok();
                    let holder = holder.as_deref().and_then(Path::to_str).unwrap_or("");
                    if self.stale(holder, id) {
                        tracing::info!(
                            id,
                            pod = holder,
                            "reclaiming the stale jail uid of a pod that is gone"
                        );
                        fs::remove_file(&link).map_err(io_err("remove", &link))?;
                        std::os::unix::fs::symlink(pod, &link).map_err(io_err("create", &link))?;
                        return Ok(id);
                    }
                }
                Err(e) => return Err(io_err("create", &link)(e)),
            }
        }
        Err(JailError::Exhausted {
            first: self.first,
            last: self.first + (self.count - 1),
            dir,
        })
    }
}

/// Ends `pod`'s uid lease, if it has one (after its processes are gone).
/// Idempotent; any range.
pub fn release(state_dir: &Path, pod: &str) {
    let dir = leases_dir(state_dir);
    if !dir.exists() {
        return;
    }
    let lock = match LeaseLock::take(&dir) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "cannot release the pod's jail uid");
            return;
        }
    };
    let Ok(rd) = fs::read_dir(&dir) else {
        return;
    };
    for e in rd.flatten() {
        if fs::read_link(e.path()).is_ok_and(|p| p.as_os_str() == pod) {
            if let Err(err) = fs::remove_file(e.path()) {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove jail uid lease");
            }
        }
    }
    drop(lock);
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_common::{Classify, Kind};

    fn leases(state: &Path, first: u32, count: u32) -> Leases {
        let mut l = Leases::new(
            state,
            &JailConfig {
                enabled: true,
                first_id: first,
                count,
            },
        )
        .unwrap();
        l.in_use = |_| false;
        l
    }

    #[test]
    fn each_pod_gets_its_own_id_and_keeps_it() {
        let d = tempfile::tempdir().unwrap();
        let l = leases(d.path(), 5000, 3);
        let mut got = Vec::new();
        for pod in ["a", "b", "c"] {
            fs::create_dir(d.path().join(pod)).unwrap();
            got.push(l.acquire(pod).unwrap());
        }
        got.sort_unstable();
        assert_eq!(got, [5000, 5001, 5002]);
        let again = l.acquire("b").unwrap();
        assert_eq!(l.acquire("b").unwrap(), again, "a pod keeps its id");
        fs::create_dir(d.path().join("d")).unwrap();
        let e = l.acquire("d").unwrap_err();
        assert!(
            matches!(
                e,
                JailError::Exhausted {
                    first: 5000,
                    last: 5002,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.kind(), Kind::ResourceExhausted);
    }

    #[test]
    fn release_frees_the_id_for_the_next_pod() {
        let d = tempfile::tempdir().unwrap();
        let l = leases(d.path(), 7000, 1);
        fs::create_dir(d.path().join("a")).unwrap();
        fs::create_dir(d.path().join("b")).unwrap();
        assert_eq!(l.acquire("a").unwrap(), 7000);
        assert!(
            l.acquire("b").is_err(),
            "a's pod dir exists: its lease is live"
        );
        release(d.path(), "a");
        release(d.path(), "a");
        assert_eq!(l.acquire("b").unwrap(), 7000);
        assert_eq!(
            fs::read_link(leases_dir(d.path()).join("7000")).unwrap(),
            Path::new("b")
        );
    }

    #[test]
    fn a_lease_whose_pod_is_gone_is_reclaimed_unless_a_process_still_runs_as_it() {
        let d = tempfile::tempdir().unwrap();
        let mut l = leases(d.path(), 9000, 1);
        fs::create_dir(d.path().join("killed")).unwrap();
        assert_eq!(l.acquire("killed").unwrap(), 9000);
        // The shim was killed and its pod dir removed, not the lease.
        fs::remove_dir(d.path().join("killed")).unwrap();
        l.in_use = |_| true;
        assert!(l.acquire("next").is_err(), "a process still runs as 9000");
        l.in_use = |_| false;
        assert_eq!(l.acquire("next").unwrap(), 9000);
        assert_eq!(
            fs::read_link(leases_dir(d.path()).join("9000")).unwrap(),
            Path::new("next")
        );
    }

    #[test]
    fn concurrent_acquires_never_share_an_id() {
        let d = tempfile::tempdir().unwrap();
        let l = leases(d.path(), 100, 64);
        let pods: Vec<String> = (0..32).map(|i| format!("p{i}")).collect();
        for p in &pods {
            fs::create_dir(d.path().join(p)).unwrap();
        }
        let ids: Vec<u32> = std::thread::scope(|s| {
            let hs: Vec<_> = pods
                .iter()
                .map(|p| {
                    let l = l.clone();
                    s.spawn(move || l.acquire(p).unwrap())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut uniq = ids.clone();
        uniq.sort_unstable();
        uniq.dedup();
        assert_eq!(uniq.len(), ids.len(), "{ids:?}");
        assert!(ids.iter().all(|i| (100..164).contains(i)));
    }

    #[test]
    fn bad_ranges_are_refused() {
        for (first, count) in [(0, 10), (10, 0), (u32::MAX - 1, 2)] {
            let c = JailConfig {
                enabled: true,
                first_id: first,
                count,
            };
            assert!(Leases::new(Path::new("/x"), &c).is_err(), "{first}+{count}");
        }
    }

    #[test]
    fn status_uid_lines_are_matched_on_every_field() {
        let s = "Name:\tqemu\nUid:\t0\t1879113729\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert!(status_has_uid(s, 1_879_113_729));
        assert!(!status_has_uid(s, 1_879_113_728));
    }
}
