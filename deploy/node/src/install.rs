//! Installing veil on the node and taking it off again.
//!
//! `install` copies the artefacts to `/opt/veil` (each file replaced by a
//! rename, so a running shim or QEMU keeps the file it started from and an
//! upgrade needs no drain), writes `/etc/veil/config.toml` unless the
//! operator has one of their own, adds the marked block to containerd's
//! config for the handlers the node can run, restarts containerd when that
//! block changed, and keeps a record of what it did in
//! `/opt/veil/install.json`. Running it again with the same artefacts
//! changes nothing. `uninstall` reads the record and undoes each step.

use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    check::Report,
    containerd::{self, ContainerdError, Runtime, CONTAINERD_CONFIG},
    host::{Host, HostError},
};

/// veil's config, as the host names it.
pub const VEIL_CONFIG: &str = "/etc/veil/config.toml";
/// The install root.
pub const OPT: &str = "/opt/veil";
/// The install record.
pub const RECORD: &str = "/opt/veil/install.json";
/// Where containerd 1.6 finds the shim: its CRI plugin ignores
/// `runtime_path` and looks `containerd-shim-veil-v2` up on its PATH, so
/// install links it here (to the installed shim; a new pod's exec follows
/// the link to the current file, a running shim keeps its own).
pub const SHIM_LINK: &str = "/usr/local/bin/containerd-shim-veil-v2";
/// The installed shim.
pub const SHIM: &str = "/opt/veil/bin/containerd-shim-veil-v2";
/// The artefacts' version marker in the image (`/veil/VERSION`, written by
/// `deploy/installer/build-image.sh`), copied to `/opt/veil/VERSION`.
pub const VERSION_FILE: &str = "VERSION";

/// Errors installing or uninstalling.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file operation failed.
    #[error("cannot {what} {path}")]
    Io {
        /// What.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// No requested handler can run here.
    #[error("no requested handler can run on this node (see `veil-node check`)")]
    NothingRuns {
        /// The check's exit code.
        code: u8,
    },
    /// containerd's config.
    #[error("containerd config {path}")]
    Containerd {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: Box<ContainerdError>,
    },
    /// A host command failed.
    #[error("restarting containerd")]
    Restart(#[source] HostError),
    /// The host could not remove a directory the installer sees as its own
    /// mount point.
    #[error("removing {0} on the host")]
    HostRemove(PathBuf, #[source] HostError),
    /// Neither systemd nor a restart command.
    #[error(
        "containerd must be restarted but the host has no systemd and no --restart-cmd was given"
    )]
    NoRestart,
    /// The install record is unreadable.
    #[error("install record {0} is corrupt")]
    Record(PathBuf, #[source] serde_json::Error),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What to install and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The artefacts: `bin/` (shim, vsock backend, virtiofsd) and `share/`
    /// (kernel, initrd, and for SNP/TDX `bzImage` and `OVMF.fd`).
    pub from: PathBuf,
    /// Handlers to enable where the node can run them.
    pub handlers: Vec<String>,
    /// How to restart containerd on a host without systemd (`sh -c`).
    pub restart_cmd: Option<String>,
}

/// What install did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// veil-node's version.
    pub version: String,
    /// The installed artefacts' version (the image's `VERSION` file);
    /// `None` when the image had none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artefacts: Option<String>,
    /// Whether install made [`SHIM_LINK`] (uninstall removes it then).
    #[serde(default)]
    pub shim_link: bool,
    /// The handlers registered with containerd.
    pub handlers: Vec<String>,
    /// Whether containerd's config file existed before veil.
    pub containerd_config_existed: bool,
    /// SHA-256 of the veil config as veil-node wrote it; `None` when the
    /// file is the operator's (then it is never touched).
    pub veil_config_sha256: Option<String>,
}

/// What a run changed (empty: nothing).
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Files written or removed, as the host names them.
    pub changed: Vec<String>,
    /// Whether containerd was restarted.
    pub restarted: bool,
    /// The handlers now enabled.
    pub handlers: Vec<String>,
    /// The artefacts' version this run installed, and the one it replaced
    /// (`None`: no marker, or nothing was installed before).
    pub artefacts: (Option<String>, Option<String>),
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, InstallError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path)(e)),
    }
}

/// Writes `bytes` to `path` by a rename (readers see the old or the new
/// file, and processes running the old one keep it); `false` if the file
/// already held exactly that.
fn put(path: &Path, bytes: &[u8], mode: u32) -> Result<bool, InstallError> {
    if read_opt(path)?.as_deref() == Some(bytes) {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(io("create", dir))?;
    let tmp = dir.join(format!(
        ".{}.veil-new",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let mut f = fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io("chmod", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    fs::rename(&tmp, path).map_err(io("rename", &tmp))?;
    Ok(true)
}

/// Copies the tree `from` to `to`; returns the relative paths written.
fn copy_tree(
    from: &Path,
    to: &Path,
    rel: &Path,
    out: &mut Vec<PathBuf>,
) -> Result<(), InstallError> {
    let here = from.join(rel);
    let mut entries: Vec<_> = fs::read_dir(&here)
        .map_err(io("read", &here))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let r = rel.join(e.file_name());
        let src = from.join(&r);
        let meta = fs::metadata(&src).map_err(io("stat", &src))?;
        if meta.is_dir() {
            copy_tree(from, to, &r, out)?;
        } else {
            let bytes = fs::read(&src).map_err(io("read", &src))?;
            if put(&to.join(&r), &bytes, meta.permissions().mode() & 0o7777)? {
                out.push(r);
            }
        }
    }
    Ok(())
}

/// veil's config for the enabled handlers, naming the installed files as
/// the host sees them.
pub fn veil_config(host: &Host, report: &Report, handlers: &[String]) -> String {
    let p = |s: &str| format!("{:?}", host.seen(s).display().to_string());
    let mut s = format!(
        "# Written by veil-node install {}. Every key is in docs/config.toml.\n\
         # Edit freely: once changed, install keeps the file as it is and\n\
         # uninstall leaves it.\n\
         image_dir = {}\nscratch_dir = {}\nvhost_device_vsock = {}\nvirtiofsd = {}\n",
        env!("CARGO_PKG_VERSION"),
        p("/var/lib/veil/images"),
        p("/var/lib/veil/scratch"),
        p("/opt/veil/bin/vhost-device-vsock"),
        p("/opt/veil/bin/virtiofsd"),
    );
    if let Some(q) = &report.qemu {
        s.push_str(&format!("qemu = {:?}\n", q.display().to_string()));
    }
    for h in handlers {
        s.push_str(&format!("\n[handlers.{h}]\n"));
        if h == "veil-snp" || h == "veil-tdx" {
            s.push_str(&format!(
                "kernel = {}\nfirmware = {}\n",
                p("/opt/veil/share/bzImage"),
                p("/opt/veil/share/OVMF.fd")
            ));
        } else {
            s.push_str(&format!("kernel = {}\n", p("/opt/veil/share/vmlinux")));
        }
        s.push_str(&format!(
            "initrd = {}\nsim_ca_dir = {}\n",
            p("/opt/veil/share/veil-initrd.cpio"),
            p("/opt/veil/sim-ca")
        ));
    }
    s
}

fn read_record(host: &Host) -> Result<Option<Record>, InstallError> {
    let path = host.at(RECORD);
    match read_opt(&path)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| InstallError::Record(path, e)),
    }
}

fn restart(host: &Host, cmd: Option<&str>) -> Result<(), InstallError> {
    if host.at("/run/systemd/system").is_dir() {
        host.run(&["systemctl", "restart", "containerd"])
            .map_err(InstallError::Restart)?;
    } else {
        let cmd = cmd.ok_or(InstallError::NoRestart)?;
        let mut c = host
            .command(&["sh", "-c", cmd])
            .map_err(InstallError::Restart)?;
        c.stdin(std::process::Stdio::null());
        crate::host::run_checked(c, cmd).map_err(InstallError::Restart)?;
    }
    Ok(())
}

/// Links [`SHIM_LINK`] to the installed shim unless something else is
/// there (then containerd 1.6 runs that, which install says); whether the
/// link is veil-node's.
fn link_shim(host: &Host, out: &mut Outcome) -> Result<bool, InstallError> {
    let link = host.at(SHIM_LINK);
    let target = host.seen(SHIM);
    match fs::read_link(&link) {
        Ok(t) if t == target => return Ok(true),
        Ok(_) | Err(_) if link.symlink_metadata().is_ok() => {
            eprintln!(
                "veil-node: {} exists and is not veil-node's link: left as it is (containerd 1.6 runs it)",
                host.seen(SHIM_LINK).display()
            );
            return Ok(false);
        }
        _ => {}
    }
    let dir = link.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(io("create", dir))?;
    std::os::unix::fs::symlink(&target, &link).map_err(io("link", &link))?;
    out.changed.push(host.seen(SHIM_LINK).display().to_string());
    Ok(true)
}

/// The handlers of `opts` that this node and these artefacts can run.
pub fn enabled(report: &Report, opts: &Options) -> Vec<String> {
    let wanted: Vec<&str> = opts.handlers.iter().map(String::as_str).collect();
    report
        .runnable(&wanted)
        .into_iter()
        .filter(|h| {
            let files: &[&str] = match *h {
                "veil-snp" | "veil-tdx" => &["share/bzImage", "share/OVMF.fd"],
                _ => &["share/vmlinux"],
            };
            files.iter().all(|f| opts.from.join(f).is_file())
        })
        .map(String::from)
        .collect()
}

/// Installs (or upgrades) veil on the node.
pub fn install(host: &Host, report: &Report, opts: &Options) -> Result<Outcome, InstallError> {
    let handlers = enabled(report, opts);
    if handlers.is_empty() {
        let wanted: Vec<&str> = opts.handlers.iter().map(String::as_str).collect();
        return Err(InstallError::NothingRuns {
            code: report.exit_code(&wanted).max(1),
        });
    }
    let mut out = Outcome {
        handlers: handlers.clone(),
        ..Default::default()
    };
    let record = read_record(host)?;
    let marker = opts.from.join(VERSION_FILE);
    let artefacts = read_opt(&marker)?.map(|b| String::from_utf8_lossy(&b).trim().to_string());
    out.artefacts = (
        artefacts.clone(),
        record.as_ref().and_then(|r| r.artefacts.clone()),
    );

    // Every file by a rename: a running shim, QEMU or backend keeps the inode
    // it started from, new pods start from the new files.
    let mut copied = Vec::new();
    copy_tree(&opts.from, &host.at(OPT), Path::new(""), &mut copied)?;
    out.changed.extend(
        copied
            .iter()
            .map(|r| host.seen(OPT).join(r).display().to_string()),
    );

    let shim_link = link_shim(host, &mut out)?;

    // veil's config: ours while nobody edited it.
    let vpath = host.at(VEIL_CONFIG);
    let current = read_opt(&vpath)?;
    let ours = match (
        &current,
        record.as_ref().and_then(|r| r.veil_config_sha256.as_ref()),
    ) {
        (None, _) => true,
        (Some(c), Some(h)) => sha256(c) == *h,
        (Some(_), None) => false,
    };
    let veil_config_sha256 = if ours {
        let text = veil_config(host, report, &handlers);
        if put(&vpath, text.as_bytes(), 0o644)? {
            out.changed
                .push(host.seen(VEIL_CONFIG).display().to_string());
        }
        Some(sha256(text.as_bytes()))
    } else {
        None
    };

    // containerd's config: the operator's part untouched, our block replaced.
    let cpath = host.at(CONTAINERD_CONFIG);
    let cerr = |source| InstallError::Containerd {
        path: cpath.clone(),
        source: Box::new(source),
    };
    let current = containerd::read_config(&cpath).map_err(io("read", &cpath))?;
    let existed = record
        .as_ref()
        .map(|r| r.containerd_config_existed)
        .unwrap_or(current.is_some());
    let base = match &current {
        Some(t) => Some(containerd::strip(t).map_err(cerr)?.0),
        None => None,
    };
    let native = report.containerd.map(|v| v.config_version()).unwrap_or(2);
    let shim = host.seen("/opt/veil/bin/containerd-shim-veil-v2");
    let runtimes: Vec<Runtime> = handlers
        .iter()
        .map(|h| Runtime {
            handler: h.clone(),
            shim: shim.display().to_string(),
            veil_config: host.seen(VEIL_CONFIG).display().to_string(),
        })
        .collect();
    let text = containerd::with_block(base.as_deref(), native, &runtimes).map_err(cerr)?;
    let mode = fs::metadata(&cpath)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    if put(&cpath, text.as_bytes(), mode)? {
        out.changed
            .push(host.seen(CONTAINERD_CONFIG).display().to_string());
        restart(host, opts.restart_cmd.as_deref())?;
        out.restarted = true;
    }

    let rec = Record {
        version: env!("CARGO_PKG_VERSION").to_string(),
        artefacts,
        shim_link,
        handlers,
        containerd_config_existed: existed,
        veil_config_sha256,
    };
    let json =
        serde_json::to_vec_pretty(&rec).map_err(|e| InstallError::Record(host.at(RECORD), e))?;
    put(&host.at(RECORD), &json, 0o644)?;
    Ok(out)
}

/// Takes veil off the node: containerd's config back as it was, veil's
/// config removed if it is still veil-node's, `/opt/veil` removed.
pub fn uninstall(host: &Host, restart_cmd: Option<&str>) -> Result<Outcome, InstallError> {
    let mut out = Outcome::default();
    let record = read_record(host)?;
    let cpath = host.at(CONTAINERD_CONFIG);
    if let Some(text) = containerd::read_config(&cpath).map_err(io("read", &cpath))? {
        let (base, had) = containerd::strip(&text).map_err(|source| InstallError::Containerd {
            path: cpath.clone(),
            source: Box::new(source),
        })?;
        if had {
            let created = record
                .as_ref()
                .is_some_and(|r| !r.containerd_config_existed);
            if created && base.is_empty() {
                fs::remove_file(&cpath).map_err(io("remove", &cpath))?;
            } else {
                let mode = fs::metadata(&cpath)
                    .map(|m| m.permissions().mode() & 0o7777)
                    .unwrap_or(0o644);
                put(&cpath, base.as_bytes(), mode)?;
            }
            out.changed
                .push(host.seen(CONTAINERD_CONFIG).display().to_string());
            restart(host, restart_cmd)?;
            out.restarted = true;
        }
    }
    let vpath = host.at(VEIL_CONFIG);
    if let (Some(cur), Some(h)) = (
        read_opt(&vpath)?,
        record.as_ref().and_then(|r| r.veil_config_sha256.as_ref()),
    ) {
        if sha256(&cur) == *h {
            fs::remove_file(&vpath).map_err(io("remove", &vpath))?;
            out.changed
                .push(host.seen(VEIL_CONFIG).display().to_string());
            if vpath.parent().is_some() {
                // Only if empty: the operator's files stay.
                let _ = remove_dir_here_or_on_host(host, "/etc/veil", false);
            }
        }
    }
    let link = host.at(SHIM_LINK);
    if record.as_ref().is_some_and(|r| r.shim_link)
        && fs::read_link(&link).is_ok_and(|t| t == host.seen(SHIM))
    {
        fs::remove_file(&link).map_err(io("remove", &link))?;
        out.changed.push(host.seen(SHIM_LINK).display().to_string());
    }
    let opt = host.at(OPT);
    if opt.exists() {
        remove_dir_here_or_on_host(host, OPT, true)?;
        out.changed.push(host.seen(OPT).display().to_string());
    }
    Ok(out)
}

/// Removes the host directory `path` (with its contents if `all`). In the
/// DaemonSet `/opt/veil` and `/etc/veil` are volumes mounted at
/// `/host/opt/veil` and `/host/etc/veil`: this mount namespace cannot remove
/// its own mount point (EBUSY), so once the directory is empty the host's
/// mount namespace removes it (`rmdir` there; the installer's mount of it
/// goes with it).
fn remove_dir_here_or_on_host(host: &Host, path: &str, all: bool) -> Result<(), InstallError> {
    let here = host.at(path);
    let r = if all {
        fs::remove_dir_all(&here)
    } else {
        fs::remove_dir(&here)
    };
    match r {
        Err(e)
            if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) && host.host_mount_ns =>
        {
            let seen = host.seen(path);
            host.run(&["rmdir", "--", &seen.display().to_string()])
                .map(|_| ())
                .map_err(|e| InstallError::HostRemove(seen, e))
        }
        r => r.map_err(io("remove", &here)),
    }
}
