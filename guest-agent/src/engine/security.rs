//! The container process's last steps: working directory, program lookup,
//! rlimits, user and groups, capabilities, `no_new_privs` and seccomp.
//! [`build_seccomp`] is also used by the agent to validate a profile early.

use std::{ffi::CString, path::Path, str::FromStr};

use caps::{CapSet, CapsHashSet};
use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use nix::unistd::{chdir, setgroups, setresgid, setresuid, Gid, Uid};
use oci_spec::runtime::{
    Capabilities, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator, PosixRlimitType, Process,
};

use super::child::{is_executable, Exec};

/// PATH used to find the program when the spec's env has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Changes to the working directory and resolves the program, as root and
/// before any restriction applies.
pub(super) fn prepare_exec(p: &Process) -> Result<Exec, String> {
    chdir(p.cwd()).map_err(|e| format!("chdir {}: {e}", p.cwd().display()))?;
    let args = p.args().clone().unwrap_or_default();
    let prog = args.first().ok_or("process.args is empty")?;
    let env = p.env().clone().unwrap_or_default();
    let path = if prog.contains('/') {
        if !is_executable(Path::new(prog)) {
            return Err(format!(
                "{prog}: no such executable file in the container (cwd {})",
                p.cwd().display()
            ));
        }
        prog.clone()
    } else {
        let search = env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH);
        search
            .split(':')
            .map(|dir| Path::new(dir).join(prog))
            .find(|c| is_executable(c))
            .map(|c| c.to_string_lossy().into_owned())
            .ok_or_else(|| format!("{prog}: executable file not found in PATH {search}"))?
    };
    let cstr = |s: &str| CString::new(s).map_err(|_| format!("NUL byte in {s:?}"));
    Ok(Exec {
        path: cstr(&path)?,
        args: args.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?,
        env: env.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?,
    })
}

/// Applies everything that restricts the process, in an order that keeps the
/// privileges each step needs until it is done.
pub(super) fn apply(p: &Process, seccomp: Option<&LinuxSeccomp>) -> Result<(), String> {
    for r in p.rlimits().iter().flatten() {
        let res = rlimit_resource(r.typ());
        let lim = libc::rlimit {
            rlim_cur: r.soft(),
            rlim_max: r.hard(),
        };
        // SAFETY: setrlimit reads the struct we pass by pointer.
        if unsafe { libc::setrlimit(res, &lim) } != 0 {
            return Err(format!(
                "setrlimit {:?}: {}",
                r.typ(),
                std::io::Error::last_os_error()
            ));
        }
    }
    let nnp = p.no_new_privileges().unwrap_or(false);
    if nnp {
        // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
        }
    }
    let filter = seccomp.map(build_seccomp).transpose()?;
    // Without no_new_privs, loading a filter needs CAP_SYS_ADMIN: load it now.
    if let (Some(f), false) = (&filter, nnp) {
        f.load().map_err(|e| format!("loading seccomp: {e}"))?;
    }
    let caps = p.capabilities().as_ref();
    if let Some(c) = caps {
        let bounding = to_caps(c.bounding().as_ref())?;
        for cap in caps::all() {
            if !bounding.contains(&cap) {
                // Dropping a capability the kernel does not know fails: ignore.
                let _ = caps::drop(None, CapSet::Bounding, cap);
            }
        }
    }
    set_user(p)?;
    if let Some(c) = caps {
        let inheritable = to_caps(c.inheritable().as_ref())?;
        let effective = to_caps(c.effective().as_ref())?;
        let permitted = to_caps(c.permitted().as_ref())?;
        let ambient = to_caps(c.ambient().as_ref())?;
        caps::set(None, CapSet::Inheritable, &inheritable)
            .map_err(|e| format!("inheritable caps: {e}"))?;
        caps::set(None, CapSet::Effective, &effective)
            .map_err(|e| format!("effective caps: {e}"))?;
        caps::set(None, CapSet::Permitted, &permitted)
            .map_err(|e| format!("permitted caps: {e}"))?;
        caps::clear(None, CapSet::Ambient).map_err(|e| format!("ambient caps: {e}"))?;
        for cap in ambient {
            // Only caps both permitted and inheritable can be ambient.
            let _ = caps::raise(None, CapSet::Ambient, cap);
        }
    }
    if let (Some(f), true) = (&filter, nnp) {
        f.load().map_err(|e| format!("loading seccomp: {e}"))?;
    }
    Ok(())
}

fn set_user(p: &Process) -> Result<(), String> {
    let u = p.user();
    let groups: Vec<Gid> = u
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    // Keep the permitted capabilities across the uid change; the capability
    // sets are then set explicitly.
    // SAFETY: PR_SET_KEEPCAPS takes integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
    let gid = Gid::from_raw(u.gid());
    setresgid(gid, gid, gid).map_err(|e| format!("setresgid {}: {e}", u.gid()))?;
    let uid = Uid::from_raw(u.uid());
    setresuid(uid, uid, uid).map_err(|e| format!("setresuid {}: {e}", u.uid()))?;
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    Ok(())
}

/// Converts OCI capabilities to the `caps` crate's.
pub(crate) fn to_caps(set: Option<&Capabilities>) -> Result<CapsHashSet, String> {
    let mut out = CapsHashSet::new();
    for c in set.into_iter().flatten() {
        let name = serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        match caps::Capability::from_str(&name) {
            Ok(cap) => {
                out.insert(cap);
            }
            Err(_) => return Err(format!("unknown capability {name}")),
        }
    }
    Ok(out)
}

fn rlimit_resource(t: PosixRlimitType) -> libc::__rlimit_resource_t {
    match t {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction, String> {
    Ok(match a {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            ScmpAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActErrno => {
            ScmpAction::Errno(errno.unwrap_or(libc::EPERM as u32) as i32)
        }
        LinuxSeccompAction::ScmpActTrace => ScmpAction::Trace(errno.unwrap_or(0) as u16),
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActNotify => {
            return Err("seccomp SCMP_ACT_NOTIFY is not supported".into())
        }
    })
}

fn compare(op: LinuxSeccompOperator, value: u64, value_two: Option<u64>) -> (ScmpCompareOp, u64) {
    match op {
        LinuxSeccompOperator::ScmpCmpNe => (ScmpCompareOp::NotEqual, value),
        LinuxSeccompOperator::ScmpCmpLt => (ScmpCompareOp::Less, value),
        LinuxSeccompOperator::ScmpCmpLe => (ScmpCompareOp::LessOrEqual, value),
        LinuxSeccompOperator::ScmpCmpEq => (ScmpCompareOp::Equal, value),
        LinuxSeccompOperator::ScmpCmpGe => (ScmpCompareOp::GreaterEqual, value),
        LinuxSeccompOperator::ScmpCmpGt => (ScmpCompareOp::Greater, value),
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            (ScmpCompareOp::MaskedEqual(value), value_two.unwrap_or(0))
        }
    }
}

/// Compiles an OCI seccomp profile. Syscall names libseccomp does not know
/// are skipped (profiles list syscalls newer than the library), as runc does.
pub(crate) fn build_seccomp(s: &LinuxSeccomp) -> Result<ScmpFilterContext, String> {
    let default = action(s.default_action(), s.default_errno_ret())?;
    let mut f = ScmpFilterContext::new(default).map_err(|e| format!("seccomp context: {e}"))?;
    for a in s.architectures().iter().flatten() {
        let name = serde_json::to_value(a)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        if let Ok(arch) = ScmpArch::from_str(&name) {
            let _ = f.add_arch(arch);
        }
    }
    f.set_ctl_nnp(false)
        .map_err(|e| format!("seccomp nnp: {e}"))?;
    for rule in s.syscalls().iter().flatten() {
        let act = action(rule.action(), rule.errno_ret())?;
        if act == default {
            continue;
        }
        let args = rule.args().clone().unwrap_or_default();
        let mut conds = Vec::new();
        for a in &args {
            if a.index() > 5 {
                return Err(format!("seccomp argument index {} out of range", a.index()));
            }
            let (op, datum) = compare(a.op(), a.value(), a.value_two());
            conds.push(ScmpArgCompare::new(a.index() as u32, op, datum));
        }
        let mut seen = std::collections::HashSet::new();
        let repeated = args.iter().any(|a| !seen.insert(a.index()));
        for name in rule.names() {
            let Ok(sys) = ScmpSyscall::from_name(name) else {
                continue;
            };
            let res = if conds.is_empty() {
                f.add_rule(act, sys).map(|_| ())
            } else if repeated {
                // Conditions on the same argument are alternatives: one rule each.
                conds
                    .iter()
                    .try_for_each(|c| f.add_rule_conditional(act, sys, &[*c]).map(|_| ()))
            } else {
                f.add_rule_conditional(act, sys, &conds).map(|_| ())
            };
            res.map_err(|e| format!("seccomp rule for {name}: {e}"))?;
        }
    }
    Ok(f)
}
