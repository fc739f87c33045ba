//! The node report: what the node has, and which veil handlers can run on it.
//!
//! Probes read the live kernel (`/dev`, `/sys`: a privileged pod sees the
//! host's) and the host's files below [`Host::root`]. Each handler needs a
//! set of [`Need`]s; a handler that lacks one cannot run, and the exit code
//! of `veil-node check` is the code of the first class of need that fails
//! (see [`Need::exit_code`], documented in `docs/install.md`).

use std::{fmt::Write as _, path::Path, time::Duration};

use crate::{containerd, host::Host};

/// What a handler needs, one class per distinct exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Need {
    /// QEMU (`qemu-system-x86_64`) on the host.
    Qemu,
    /// KVM that really runs a guest (the canary).
    Kvm,
    /// SEV-SNP host support (`kvm_amd` with `sev_snp`).
    Snp,
    /// TDX host support (`kvm_intel` with `tdx`).
    Tdx,
    /// Kernel vhost-vsock (`/dev/vhost-vsock`).
    VhostVsock,
    /// A containerd veil supports (1.6 or newer).
    Containerd,
    /// Free disk for images and scratch disks.
    Disk,
}

impl Need {
    /// The exit code of `veil-node check` when this need fails.
    pub fn exit_code(self) -> u8 {
        match self {
            Need::Qemu => 10,
            Need::Kvm => 11,
            Need::Snp | Need::Tdx => 12,
            Need::VhostVsock => 13,
            Need::Containerd => 14,
            Need::Disk => 15,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Need::Qemu => "QEMU",
            Need::Kvm => "KVM usable for guests",
            Need::Snp => "SEV-SNP host support",
            Need::Tdx => "TDX host support",
            Need::VhostVsock => "/dev/vhost-vsock",
            Need::Containerd => "containerd >= 1.6",
            Need::Disk => "free disk",
        }
    }
}

/// What every handler needs, and what each adds.
pub fn needs(handler: &str) -> Vec<Need> {
    let mut n = vec![Need::Qemu, Need::Containerd, Need::Disk];
    match handler {
        "veil-snp" => n.extend([Need::Kvm, Need::Snp, Need::VhostVsock]),
        "veil-tdx" => n.extend([Need::Kvm, Need::Tdx, Need::VhostVsock]),
        _ => {}
    }
    n
}

/// Free disk below which [`Need::Disk`] fails, bytes.
pub const MIN_FREE_BYTES: u64 = 2 << 30;

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Probe {
    /// What was probed.
    pub name: &'static str,
    /// The need it settles (none: informational).
    pub need: Option<Need>,
    /// Whether it is there.
    pub ok: bool,
    /// What was found, or why not.
    pub detail: String,
}

/// The whole report.
#[derive(Debug, Clone)]
pub struct Report {
    /// Every probe, in order.
    pub probes: Vec<Probe>,
    /// containerd's version, if found.
    pub containerd: Option<containerd::Version>,
    /// QEMU as the host names it, if found.
    pub qemu: Option<std::path::PathBuf>,
}

impl Report {
    /// The needs that failed.
    pub fn missing(&self) -> Vec<Need> {
        let mut m: Vec<Need> = self
            .probes
            .iter()
            .filter(|p| !p.ok)
            .filter_map(|p| p.need)
            .collect();
        m.sort();
        m.dedup();
        m
    }

    /// What `handler` lacks (empty: it can run).
    pub fn lacks(&self, handler: &str) -> Vec<Need> {
        let missing = self.missing();
        needs(handler)
            .into_iter()
            .filter(|n| missing.contains(n))
            .collect()
    }

    /// The handlers of `handlers` that can run here.
    pub fn runnable<'a>(&self, handlers: &[&'a str]) -> Vec<&'a str> {
        handlers
            .iter()
            .copied()
            .filter(|h| self.lacks(h).is_empty())
            .collect()
    }

    /// The exit code for `handlers`: 0 when all can run, otherwise the
    /// smallest code of what they lack.
    pub fn exit_code(&self, handlers: &[&str]) -> u8 {
        handlers
            .iter()
            .flat_map(|h| self.lacks(h))
            .map(Need::exit_code)
            .min()
            .unwrap_or(0)
    }

    /// The report as a table: probes, then the handlers.
    pub fn table(&self, handlers: &[&str]) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{:<20} {:<4} DETAIL", "CHECK", "OK");
        for p in &self.probes {
            let ok = if p.ok { "yes" } else { "no" };
            let _ = writeln!(s, "{:<20} {:<4} {}", p.name, ok, p.detail);
        }
        let _ = writeln!(s, "\n{:<20} {:<4} LACKS", "HANDLER", "RUNS");
        for h in handlers {
            let lacks = self.lacks(h);
            let runs = if lacks.is_empty() { "yes" } else { "no" };
            let what: Vec<&str> = lacks.iter().map(|n| n.label()).collect();
            let _ = writeln!(s, "{:<20} {:<4} {}", h, runs, what.join(", "));
        }
        s
    }
}

fn sys_flag(path: &str) -> Option<bool> {
    std::fs::read_to_string(path)
        .ok()
        .map(|v| matches!(v.trim(), "Y" | "y" | "1"))
}

fn probe(name: &'static str, need: Option<Need>, ok: bool, detail: impl Into<String>) -> Probe {
    Probe {
        name,
        need,
        ok,
        detail: detail.into(),
    }
}

fn device(path: &str, need: Option<Need>, name: &'static str, absent: &str) -> Probe {
    let ok = Path::new(path).exists();
    let detail = if ok {
        format!("{path} present")
    } else {
        format!("{path} missing: {absent}")
    };
    probe(name, need, ok, detail)
}

/// Free bytes of the filesystem holding `path` (or its nearest existing
/// parent).
fn free_bytes(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let st = nix::sys::statvfs::statvfs(existing).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// A TEE's host support: the KVM module's parameter.
fn tee_probe(name: &'static str, need: Need, module: &str, param: &str, what: &str) -> Probe {
    let flag = sys_flag(&format!("/sys/module/{module}/parameters/{param}"));
    let detail = match flag {
        Some(true) => format!("{module} {param}=Y"),
        Some(false) => format!("{module} loaded with {param} off"),
        None => format!("no {module} with {param} (not a {what} host)"),
    };
    probe(name, Some(need), flag == Some(true), detail)
}

/// Probes the node.
pub fn run(host: &Host) -> Report {
    let mut probes = Vec::new();
    let kvm = match veil_shim::vmm::accel::kvm_canary(Duration::from_secs(2)) {
        Ok(()) => probe(
            "kvm",
            Some(Need::Kvm),
            true,
            "the canary guest ran under KVM",
        ),
        Err(e) => probe(
            "kvm",
            Some(Need::Kvm),
            false,
            format!(
                "unusable for guests ({}); veil and veil-sim fall back to TCG (software emulation)",
                veil_shim::error_chain(&e)
            ),
        ),
    };
    probes.push(kvm);
    probes.push(device(
        "/dev/vhost-vsock",
        Some(Need::VhostVsock),
        "vhost-vsock",
        "hybrid vsock (vhost-device-vsock) serves veil and veil-sim; confidential handlers need it (modprobe vhost_vsock)",
    ));
    probes.push(device(
        "/dev/vhost-net",
        None,
        "vhost-net",
        "pod networking uses QEMU's userspace virtio-net (slower)",
    ));
    probes.push(tee_probe(
        "sev-snp",
        Need::Snp,
        "kvm_amd",
        "sev_snp",
        "SNP-enabled AMD",
    ));
    probes.push(tee_probe(
        "tdx",
        Need::Tdx,
        "kvm_intel",
        "tdx",
        "TDX-enabled Intel",
    ));
    let qemu = crate::host::find_on_host(
        host,
        "qemu-system-x86_64",
        &["/usr/local/bin", "/usr/bin", "/usr/libexec", "/bin"],
    );
    probes.push(match &qemu {
        Some(q) => probe("qemu", Some(Need::Qemu), true, q.display().to_string()),
        None => probe(
            "qemu",
            Some(Need::Qemu),
            false,
            "qemu-system-x86_64 not found on the host (Debian: apt-get install qemu-system-x86)",
        ),
    });
    let version = host
        .run(&["containerd", "--version"])
        .map_err(|e| veil_shim::error_chain(&e))
        .and_then(|o| {
            containerd::Version::parse(&String::from_utf8_lossy(&o.stdout))
                .map_err(|e| veil_shim::error_chain(&e))
        });
    let containerd_version = version.as_ref().ok().copied();
    probes.push(match version {
        Ok(v) if v >= (containerd::Version { major: 1, minor: 6 }) => probe(
            "containerd",
            Some(Need::Containerd),
            true,
            format!("{v} (config version {})", v.config_version()),
        ),
        Ok(v) => probe(
            "containerd",
            Some(Need::Containerd),
            false,
            format!("{v} is too old (1.6 or newer)"),
        ),
        Err(e) => probe("containerd", Some(Need::Containerd), false, e),
    });
    let config = host.at(containerd::CONTAINERD_CONFIG);
    let registered = containerd::read_config(&config)
        .ok()
        .flatten()
        .map(|t| containerd::registers_veil(&t))
        .unwrap_or(false);
    probes.push(probe(
        "veil registered",
        None,
        registered,
        if registered {
            format!("{} registers io.containerd.veil.v2", config.display())
        } else {
            format!("{} does not register veil (yet)", config.display())
        },
    ));
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    // Informational: the shim runs on either hierarchy (the pod's limits
    // are enforced inside the guest).
    probes.push(probe(
        "cgroup",
        None,
        v2,
        if v2 {
            "cgroup v2 (unified)"
        } else {
            "no unified cgroup hierarchy at /sys/fs/cgroup (cgroup v1: works, kubelet prefers v2)"
        },
    ));
    let var = host.at("/var/lib");
    let free = free_bytes(&var);
    probes.push(probe(
        "disk",
        Some(Need::Disk),
        free.is_some_and(|f| f >= MIN_FREE_BYTES),
        match free {
            Some(f) => format!(
                "{} MiB free for images and scratch at {} (need {} MiB)",
                f >> 20,
                var.display(),
                MIN_FREE_BYTES >> 20
            ),
            None => format!("cannot stat {}", var.display()),
        },
    ));
    Report {
        probes,
        containerd: containerd_version,
        qemu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(failing: &[Need]) -> Report {
        let all = [
            Need::Qemu,
            Need::Kvm,
            Need::Snp,
            Need::Tdx,
            Need::VhostVsock,
            Need::Containerd,
            Need::Disk,
        ];
        Report {
            probes: all
                .iter()
                .map(|n| probe(n.label(), Some(*n), !failing.contains(n), ""))
                .collect(),
            containerd: None,
            qemu: None,
        }
    }

    #[test]
    fn handlers_and_exit_codes() {
        let all = ["veil", "veil-sim", "veil-snp", "veil-tdx"];
        // A TCG machine without TEEs: the plain handlers run.
        let r = report(&[Need::Kvm, Need::Snp, Need::Tdx, Need::VhostVsock]);
        assert_eq!(r.runnable(&all), vec!["veil", "veil-sim"]);
        assert_eq!(r.exit_code(&all), 11);
        assert_eq!(r.exit_code(&["veil", "veil-sim"]), 0);
        assert_eq!(
            r.lacks("veil-snp"),
            vec![Need::Kvm, Need::Snp, Need::VhostVsock]
        );
        let t = r.table(&all);
        assert!(t.contains("veil-tdx"), "{t}");
        assert!(t.contains("TDX host support"), "{t}");
        // No containerd: nothing runs.
        let r = report(&[Need::Containerd]);
        assert!(r.runnable(&all).is_empty());
        assert_eq!(r.exit_code(&["veil"]), 14);
    }
}
