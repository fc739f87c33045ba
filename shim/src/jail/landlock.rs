//! Landlock without a crate: the three syscalls and the ABI 1 access rights,
//! enough for a rule set that lets a process write only below some
//! directories.

use std::{ffi::CString, io::ErrorKind, os::unix::ffi::OsStrExt, path::Path};

use super::JailError;

/// A Landlock rule set, prepared before fork: the process may write (create,
/// remove, write to) only below the given directories; reading and executing
/// stay as its permissions allow. Applied in the child after
/// [`super::Credentials::apply_in_child`] (it needs `no_new_privs`).
#[derive(Debug, Clone)]
pub struct WriteOnlyBelow {
    dirs: Vec<CString>,
}

mod sys {
    //! The ABI 1 (Linux 5.13) constants and attribute layouts.
    pub const CREATE_RULESET_VERSION: u32 = 1;
    pub const RULE_PATH_BENEATH: libc::c_int = 1;
    pub const WRITE_FILE: u64 = 1 << 1;
    pub const REMOVE_DIR: u64 = 1 << 4;
    pub const REMOVE_FILE: u64 = 1 << 5;
    pub const MAKE_CHAR: u64 = 1 << 6;
    pub const MAKE_DIR: u64 = 1 << 7;
    pub const MAKE_REG: u64 = 1 << 8;
    pub const MAKE_SOCK: u64 = 1 << 9;
    pub const MAKE_FIFO: u64 = 1 << 10;
    pub const MAKE_BLOCK: u64 = 1 << 11;
    pub const MAKE_SYM: u64 = 1 << 12;
    /// Every write-like right of ABI 1.
    pub const WRITES: u64 = WRITE_FILE
        | REMOVE_DIR
        | REMOVE_FILE
        | MAKE_CHAR
        | MAKE_DIR
        | MAKE_REG
        | MAKE_SOCK
        | MAKE_FIFO
        | MAKE_BLOCK
        | MAKE_SYM;

    #[repr(C)]
    pub struct RulesetAttr {
        pub handled_access_fs: u64,
    }

    #[repr(C, packed)]
    pub struct PathBeneathAttr {
        pub allowed_access: u64,
        pub parent_fd: i32,
    }
}

/// The kernel's Landlock ABI version, 0 without Landlock.
pub fn landlock_abi() -> i64 {
    // SAFETY: the version query takes no attribute pointer and size 0.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<sys::RulesetAttr>(),
            0usize,
            sys::CREATE_RULESET_VERSION,
        )
    };
    v.max(0)
}

impl WriteOnlyBelow {
    /// Writes allowed below `dirs` only.
    pub fn new(dirs: &[&Path]) -> Result<Self, JailError> {
        let dirs = dirs
            .iter()
            .map(|d| {
                CString::new(d.as_os_str().as_bytes()).map_err(|_| JailError::Io {
                    what: "name",
                    path: d.to_path_buf(),
                    source: std::io::Error::from(ErrorKind::InvalidInput),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(WriteOnlyBelow { dirs })
    }

    /// Restricts the calling process (and what it executes).
    ///
    /// # Safety
    ///
    /// Only between fork and exec in the child; it calls open(2), close(2),
    /// prctl(2) and the Landlock syscalls, all async-signal-safe, on data
    /// prepared before the fork.
    pub unsafe fn apply_in_child(&self) -> std::io::Result<()> {
        let last_os = std::io::Error::last_os_error;
        let attr = sys::RulesetAttr {
            handled_access_fs: sys::WRITES,
        };
        // SAFETY: `attr` is a valid ruleset attribute of the size passed.
        let ruleset = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const sys::RulesetAttr,
                std::mem::size_of::<sys::RulesetAttr>(),
                0u32,
            )
        };
        if ruleset < 0 {
            return Err(last_os());
        }
        let Ok(ruleset) = libc::c_int::try_from(ruleset) else {
            return Err(std::io::Error::from(ErrorKind::InvalidData));
        };
        let result = (|| {
            for d in &self.dirs {
                // SAFETY: `d` is a NUL-terminated path.
                let fd = unsafe {
                    libc::open(
                        d.as_ptr(),
                        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                    )
                };
                if fd < 0 {
                    return Err(last_os());
                }
                let rule = sys::PathBeneathAttr {
                    allowed_access: sys::WRITES,
                    parent_fd: fd,
                };
                // SAFETY: `rule` is a valid path-beneath attribute; `ruleset`
                // and `fd` are open descriptors.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_landlock_add_rule,
                        ruleset,
                        sys::RULE_PATH_BENEATH,
                        &rule as *const sys::PathBeneathAttr,
                        0u32,
                    )
                };
                // SAFETY: `fd` is ours.
                unsafe { libc::close(fd) };
                if r != 0 {
                    return Err(last_os());
                }
            }
            // SAFETY: prctl with integer arguments (restrict_self needs it
            // unless the caller has CAP_SYS_ADMIN).
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return Err(last_os());
            }
            // SAFETY: `ruleset` is an open Landlock ruleset descriptor.
            if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) } != 0 {
                return Err(last_os());
            }
            Ok(())
        })();
        // SAFETY: `ruleset` is ours.
        unsafe { libc::close(ruleset) };
        result
    }
}
