//! The jail of a pod's host processes: QEMU and vhost-device-vsock run as a
//! uid and gid of their own, one pair per pod, with no supplementary groups
//! but those of the devices they open, no capabilities, `no_new_privs`, and
//! (the backend) a Landlock rule set that lets it write only its own
//! directory. See docs/threat-model.md, "The host side".
//!
//! This module owns choosing the ids ([`leases`]: a lease per pod under
//! `<state_dir>/.uids`, crash-safe, reclaimed by the pod's cleanup or by the
//! next allocation that finds its pod gone), the credential drop between fork
//! and exec, and the checks that say, before a spawn, what the jailed process
//! could not reach. Which of the pod's files the jail gets is the boot's
//! business ([`crate::sandbox`]); spawning is [`crate::process`].

use std::{
    fs,
    io::ErrorKind,
    os::unix::{
        ffi::OsStrExt,
        fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use veil_common::{Classify, Kind};

mod landlock;
mod leases;

pub use landlock::{landlock_abi, WriteOnlyBelow};
pub use leases::{leases_dir, release, uid_in_use, Leases};

/// The `[jail]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailConfig {
    /// Run QEMU and the vsock backend of each pod as its own uid/gid. `false`
    /// runs them as root (as the shim), said at every pod start.
    pub enabled: bool,
    /// First id of the range pods' uids and gids are taken from.
    pub first_id: u32,
    /// How many ids the range has (the most jailed pods at once).
    pub count: u32,
}

/// The default range: 65536 ids from 0x70010000, in the part of the id space
/// that systemd leaves unused (above its container ranges, below 2^31), so
/// they collide with no login user, dynamic user or container user namespace.
pub const DEFAULT_FIRST_ID: u32 = 0x7001_0000;

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            enabled: true,
            first_id: DEFAULT_FIRST_ID,
            count: 65536,
        }
    }
}

/// Errors of the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The range in the configuration is empty or includes root.
    #[error(
        "jail id range {first}+{count} is invalid: it must be non-empty, above 0 and below 2^32-1"
    )]
    BadRange {
        /// First id.
        first: u32,
        /// Count.
        count: u32,
    },
    /// Every id of the range is leased to a pod.
    #[error(
        "no free jail uid between {first} and {last}: every one is leased to a pod (see {dir})"
    )]
    Exhausted {
        /// First id.
        first: u32,
        /// Last id.
        last: u32,
        /// The lease directory.
        dir: PathBuf,
    },
    /// A file operation on the leases or the pod's files failed.
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
    /// The jailed process could not reach a file it needs.
    #[error(
        "{what} {path} is out of reach of the pod's jail (uid {uid}): {blocker} is mode {mode:04o}, \
         owner {owner}:{group}, which does not let it {need}; make it reachable, or run pods' \
         processes as root with `[jail] enabled = false` in the veil config"
    )]
    Unreachable {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The jail's uid.
        uid: u32,
        /// The path component that stops it.
        blocker: PathBuf,
        /// Its mode.
        mode: u32,
        /// Its owner.
        owner: u32,
        /// Its group.
        group: u32,
        /// What was needed ("search", "read", "execute", "read and write").
        need: &'static str,
    },
    /// A device the process opens grants no group access to a non-root user.
    #[error(
        "{path} is mode {mode:04o}, owner {owner}:{group}: no group or other access a jailed {who} \
         could be given; make it group read-write (e.g. 0660 root:kvm), or run pods' processes as \
         root with `[jail] enabled = false` in the veil config"
    )]
    Device {
        /// The device.
        path: PathBuf,
        /// Its mode.
        mode: u32,
        /// Its owner.
        owner: u32,
        /// Its group.
        group: u32,
        /// Who needs it.
        who: &'static str,
    },
}

impl Classify for JailError {
    fn kind(&self) -> Kind {
        match self {
            JailError::BadRange { .. }
            | JailError::Unreachable { .. }
            | JailError::Device { .. } => Kind::FailedPrecondition,
            JailError::Exhausted { .. } => Kind::ResourceExhausted,
            JailError::Io { .. } => Kind::Internal,
        }
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JailError + 'a {
    move |source| JailError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The most supplementary groups a jailed process gets (device groups).
pub const MAX_GROUPS: usize = 4;

/// What a jailed child runs as. `Copy` and fixed-size, so that it is read
/// between fork and exec without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// uid (real, effective, saved).
    pub uid: u32,
    /// gid (real, effective, saved).
    pub gid: u32,
    groups: [u32; MAX_GROUPS],
    n_groups: usize,
}

impl Credentials {
    /// `uid`/`gid` with no supplementary groups.
    pub fn new(uid: u32, gid: u32) -> Self {
        Credentials {
            uid,
            gid,
            groups: [0; MAX_GROUPS],
            n_groups: 0,
        }
    }

    /// The supplementary groups.
    pub fn groups(&self) -> &[u32] {
        &self.groups[..self.n_groups]
    }

    /// Adds supplementary group `gid` (once; at most [`MAX_GROUPS`]).
    pub fn add_group(&mut self, gid: u32) {
        if gid != self.gid && !self.groups().contains(&gid) && self.n_groups < MAX_GROUPS {
            self.groups[self.n_groups] = gid;
            self.n_groups += 1;
        }
    }

    fn has_group(&self, gid: u32) -> bool {
        gid == self.gid || self.groups().contains(&gid)
    }

    /// Gives the jail access to device `path` (read-write): nothing if anyone
    /// may open it, its group if the group may, an error naming the device
    /// otherwise. `who` names the process in the error.
    pub fn grant_device(&mut self, path: &Path, who: &'static str) -> Result<(), JailError> {
        let m = fs::metadata(path).map_err(io_err("stat", path))?;
        let mode = m.mode() & 0o7777;
        if mode & 0o006 == 0o006 {
            return Ok(());
        }
        if mode & 0o060 == 0o060 && m.gid() != 0 {
            self.add_group(m.gid());
            if self.has_group(m.gid()) {
                return Ok(());
            }
        }
        Err(JailError::Device {
            path: path.to_path_buf(),
            mode,
            owner: m.uid(),
            group: m.gid(),
            who,
        })
    }

    /// Drops to these credentials in a forked child: an empty capability
    /// bounding set, the supplementary groups, gid, uid (real, effective and
    /// saved: the kernel clears the permitted and effective capabilities
    /// with the last root uid), and `no_new_privs` (no set-id or
    /// file-capability binary gives anything back).
    ///
    /// # Safety
    ///
    /// Only between fork and exec in the child: it changes the calling
    /// process's credentials and calls nothing that is not
    /// async-signal-safe.
    pub unsafe fn apply_in_child(&self) -> std::io::Result<()> {
        let last_os = std::io::Error::last_os_error;
        // Capabilities beyond the kernel's last one give EINVAL: stop there.
        for cap in 0..64 {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                let e = last_os();
                if e.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(e);
            }
        }
        // SAFETY: `groups` is a valid array of at least `n_groups` gids.
        if unsafe { libc::setgroups(self.n_groups, self.groups.as_ptr()) } != 0 {
            return Err(last_os());
        }
        // SAFETY: plain syscalls on integers.
        if unsafe { libc::setresgid(self.gid, self.gid, self.gid) } != 0 {
            return Err(last_os());
        }
        // SAFETY: as above.
        if unsafe { libc::setresuid(self.uid, self.uid, self.uid) } != 0 {
            return Err(last_os());
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(last_os());
        }
        Ok(())
    }
}

/// A pod's jail: its leased uid/gid and the directory its jailed processes
/// own, `<pod dir>/vm` (mode 0700): the QMP socket, the vsock sockets and
/// the console log live there. The pod directory itself stays root's (its
/// PID and file records drive `delete`; a jailed process must not write
/// them), searchable but not readable by others, as is the state dir.
#[derive(Debug, Clone)]
pub struct PodJail {
    /// The pod's credentials (no supplementary groups; see
    /// [`Credentials::grant_device`]).
    pub creds: Credentials,
    /// The directory the jail owns.
    pub dir: PathBuf,
}

impl PodJail {
    /// Leases `pod`'s uid and gives it `<pod_dir>/vm`; `None` when the
    /// config disables the jail (said in the log: never silently).
    pub fn prepare(
        state_dir: &Path,
        pod_dir: &Path,
        pod: &str,
        config: &JailConfig,
    ) -> Result<Option<PodJail>, JailError> {
        if !config.enabled {
            tracing::warn!("[jail] enabled = false: the pod's QEMU and vsock backend run as root");
            return Ok(None);
        }
        let id = Leases::new(state_dir, config)?.acquire(pod)?;
        let creds = Credentials::new(id, id);
        make_searchable(state_dir)?;
        make_searchable(pod_dir)?;
        let dir = pod_dir.join("vm");
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create", &dir)(e)),
        }
        chown(&dir, &creds)?;
        tracing::debug!(uid = id, "pod jail");
        Ok(Some(PodJail { creds, dir }))
    }

    /// Gives the jail a file the shim created for it (a socket it must
    /// connect to, its scratch disk): owned by the pod's ids, mode `mode`.
    pub fn give(&self, path: &Path, mode: u32) -> Result<(), JailError> {
        chown(path, &self.creds)?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(io_err("set the mode of", path))
    }

    /// The credentials QEMU runs with: the pod's, plus the groups of the
    /// devices it opens by name (`/dev/kvm` under KVM, `/dev/vhost-net` for
    /// vhost-net NICs, `/dev/sev` for SEV-SNP), after checking that it can
    /// execute `qemu`. The files it boots are handed over open
    /// ([`crate::vmm::qemu`]), and so are the disks hot-added later (an fd
    /// set, [`crate::vmm::qmp`]).
    pub fn qemu_credentials(
        &self,
        qemu: &Path,
        devices: &[&Path],
    ) -> Result<Credentials, JailError> {
        let mut c = self.creds;
        for d in devices {
            c.grant_device(d, "QEMU")?;
        }
        check_exec("QEMU", qemu, &c)?;
        Ok(c)
    }

    /// The credentials of the vsock backend (the pod's, no groups), after
    /// checking that it can execute `binary`.
    pub fn backend_credentials(&self, binary: &Path) -> Result<Credentials, JailError> {
        check_exec("the vsock backend", binary, &self.creds)?;
        Ok(self.creds)
    }
}

/// Checks that `c` can execute `program` (looked up on `PATH` without a
/// slash); a program that is not found is left to the spawn to report.
pub fn check_exec(what: &'static str, program: &Path, c: &Credentials) -> Result<(), JailError> {
    match find_program(program) {
        Some(p) if p.exists() => check_reach(what, &p, Access::Execute, c),
        _ => Ok(()),
    }
}

/// `program` as the kernel would find it for exec: itself when it has a
/// slash, else the first file of that name on `PATH`.
pub fn find_program(program: &Path) -> Option<PathBuf> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return Some(program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// What a jailed process must be able to do with a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Open it for reading.
    Read,
    /// Execute it.
    Execute,
    /// Open it for reading and writing.
    ReadWrite,
    /// Search it (a directory whose entries are opened by name).
    Search,
}

impl Access {
    fn bits(self) -> (u32, &'static str) {
        match self {
            Access::Read => (0o4, "read"),
            Access::Execute => (0o1, "execute"),
            Access::ReadWrite => (0o6, "read and write"),
            Access::Search => (0o1, "search"),
        }
    }
}

/// The permission bits (`rwx` as 0-7) that `mode`, owned by `owner:group`,
/// gives `c` (POSIX classes; ACLs are not read).
fn class_bits(c: &Credentials, mode: u32, owner: u32, group: u32) -> u32 {
    if owner == c.uid {
        (mode >> 6) & 7
    } else if c.has_group(group) {
        (mode >> 3) & 7
    } else {
        mode & 7
    }
}

/// Checks that `c` may `access` `path` (every directory on the way
/// searchable, the file itself as asked), naming what stops it. `what`
/// names the file in the error.
pub fn check_reach(
    what: &'static str,
    path: &Path,
    access: Access,
    c: &Credentials,
) -> Result<(), JailError> {
    let real = fs::canonicalize(path).map_err(io_err("resolve", path))?;
    let deny = |blocker: &Path, m: &fs::Metadata, need| JailError::Unreachable {
        what,
        path: path.to_path_buf(),
        uid: c.uid,
        blocker: blocker.to_path_buf(),
        mode: m.mode() & 0o7777,
        owner: m.uid(),
        group: m.gid(),
        need,
    };
    let mut dirs: Vec<&Path> = real.ancestors().skip(1).collect();
    dirs.reverse();
    for dir in dirs {
        let m = fs::metadata(dir).map_err(io_err("stat", dir))?;
        if class_bits(c, m.mode(), m.uid(), m.gid()) & 1 == 0 {
            return Err(deny(dir, &m, "search"));
        }
    }
    let m = fs::metadata(&real).map_err(io_err("stat", &real))?;
    let (want, need) = access.bits();
    if class_bits(c, m.mode(), m.uid(), m.gid()) & want != want {
        return Err(deny(&real, &m, need));
    }
    Ok(())
}

/// Adds search permission for group and others to `dir` if others lack it,
/// so that jailed processes reach what is below by name (and list nothing).
pub fn make_searchable(dir: &Path) -> Result<(), JailError> {
    let m = fs::metadata(dir).map_err(io_err("stat", dir))?;
    let mode = m.mode() & 0o7777;
    if mode & 0o001 == 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o011))
            .map_err(io_err("make searchable", dir))?;
    }
    Ok(())
}

/// Gives `path` to the jail: owned by its uid and gid.
pub fn chown(path: &Path, c: &Credentials) -> Result<(), JailError> {
    std::os::unix::fs::chown(path, Some(c.uid), Some(c.gid)).map_err(io_err("chown", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reach_names_the_directory_that_stops_a_jailed_uid() {
        let d = tempfile::tempdir().unwrap();
        let closed = d.path().join("closed");
        fs::create_dir(&closed).unwrap();
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&closed, fs::Permissions::from_mode(0o700)).unwrap();
        let kernel = closed.join("vmlinux");
        fs::write(&kernel, b"k").unwrap();
        fs::set_permissions(&kernel, fs::Permissions::from_mode(0o644)).unwrap();
        let c = Credentials::new(4242, 4242);
        check_reach("the temp dir", d.path(), Access::Search, &c)
            .expect("the temp dir (under /tmp) is reachable by anyone");
        let e = check_reach("kernel", &kernel, Access::Read, &c).unwrap_err();
        match &e {
            JailError::Unreachable { blocker, need, .. } => {
                assert_eq!(blocker, &closed);
                assert_eq!(*need, "search");
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("enabled = false"), "{e}");
        assert_eq!(e.kind(), Kind::FailedPrecondition);
        fs::set_permissions(&closed, fs::Permissions::from_mode(0o711)).unwrap();
        check_reach("kernel", &kernel, Access::Read, &c).unwrap();
        let e = check_reach("kernel", &kernel, Access::ReadWrite, &c).unwrap_err();
        assert!(
            matches!(
                e,
                JailError::Unreachable {
                    need: "read and write",
                    ..
                }
            ),
            "{e}"
        );
        chown(&kernel, &c).unwrap();
        fs::set_permissions(&kernel, fs::Permissions::from_mode(0o600)).unwrap();
        check_reach("kernel", &kernel, Access::ReadWrite, &c).unwrap();
        let other = Credentials::new(4343, 4343);
        assert!(check_reach("kernel", &kernel, Access::Read, &other).is_err());
    }

    #[test]
    fn a_device_is_granted_through_its_group_or_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("kvm");
        fs::write(&dev, b"").unwrap();
        std::os::unix::fs::chown(&dev, Some(0), Some(36)).unwrap();
        fs::set_permissions(&dev, fs::Permissions::from_mode(0o660)).unwrap();
        let mut c = Credentials::new(5000, 5000);
        c.grant_device(&dev, "QEMU").unwrap();
        assert_eq!(c.groups(), [36]);
        c.grant_device(&dev, "QEMU").unwrap();
        assert_eq!(c.groups(), [36], "once");
        fs::set_permissions(&dev, fs::Permissions::from_mode(0o600)).unwrap();
        let e = Credentials::new(5000, 5000)
            .grant_device(&dev, "QEMU")
            .unwrap_err();
        assert!(e.to_string().contains("mode 0600"), "{e}");
        fs::set_permissions(&dev, fs::Permissions::from_mode(0o666)).unwrap();
        let mut open = Credentials::new(5000, 5000);
        open.grant_device(&dev, "QEMU").unwrap();
        assert!(open.groups().is_empty());
    }

    /// A forked child that drops to the credentials has no capabilities, no
    /// supplementary groups but the granted one, and no_new_privs; under the
    /// Landlock rule set it writes below its directory only.
    #[test]
    fn a_jailed_child_has_its_ids_no_caps_and_writes_only_below_its_dir() {
        use std::os::unix::process::CommandExt;
        let d = tempfile::tempdir().unwrap();
        let own = d.path().join("own");
        fs::create_dir(&own).unwrap();
        let mut c = Credentials::new(4545, 4546);
        c.add_group(36);
        chown(&own, &c).unwrap();
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let rules = WriteOnlyBelow::new(&[&own]).unwrap();
        let script = format!(
            "grep -E '^(Uid|Gid|Groups|CapEff|CapPrm|CapBnd|NoNewPrivs):' /proc/self/status; \
             echo x > {own}/a && echo wrote-own; echo x > {top}/b && echo wrote-top; true",
            own = own.display(),
            top = d.path().display()
        );
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c").arg(script);
        let landlock = landlock_abi() > 0;
        // SAFETY: the closure only makes async-signal-safe calls on data
        // prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                c.apply_in_child()?;
                if landlock {
                    rules.apply_in_child()?;
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Uid:\t4545\t4545\t4545\t4545"), "{text}");
        assert!(text.contains("Gid:\t4546\t4546\t4546\t4546"), "{text}");
        assert!(text.contains("Groups:\t36"), "{text}");
        assert!(text.contains("CapEff:\t0000000000000000"), "{text}");
        assert!(text.contains("CapPrm:\t0000000000000000"), "{text}");
        assert!(text.contains("CapBnd:\t0000000000000000"), "{text}");
        assert!(text.contains("NoNewPrivs:\t1"), "{text}");
        assert!(text.contains("wrote-own"), "{text}");
        if landlock {
            assert!(
                !text.contains("wrote-top"),
                "Landlock let it write outside: {text}"
            );
        } else {
            eprintln!("this kernel has no Landlock: only the credentials were checked");
        }
    }
}
