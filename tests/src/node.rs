//! Node-install fixtures: the artefacts laid out as the installer image
//! holds them, a private node root, and `veil-node` run against it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{bail, Context, Result};

use crate::Artefacts;

/// The `veil-node` binary (built by `cargo build`/`cargo test --workspace`).
pub fn veil_node_bin() -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"));
    let p = target.join("debug/veil-node");
    if !p.is_file() {
        bail!("{} not built: run cargo build -p veil-node", p.display());
    }
    Ok(p)
}

/// Lays out `a` under `dir` as the installer image does (`bin/`, `share/`).
pub fn image_tree(a: &Artefacts, dir: &Path) -> Result<()> {
    let files = [
        (a.require_shim()?, "bin/containerd-shim-veil-v2"),
        (a.vhost_device_vsock.as_path(), "bin/vhost-device-vsock"),
        (a.virtiofsd.as_path(), "bin/virtiofsd"),
        (a.kernel.as_path(), "share/vmlinux"),
        (a.initrd.as_path(), "share/veil-initrd.cpio"),
    ];
    for (src, rel) in files {
        let dst = dir.join(rel);
        fs::create_dir_all(dst.parent().context("no parent")?)?;
        fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
    }
    Ok(())
}

/// A private node root (a temp dir the installer treats as the host's `/`)
/// with QEMU where the host has it.
pub struct NodeRoot {
    /// The root.
    pub dir: tempfile::TempDir,
    /// The artefacts to install from.
    pub from: PathBuf,
}

impl NodeRoot {
    /// A root holding containerd's config `config` (`None`: no file).
    pub fn new(a: &Artefacts, config: Option<&str>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("veil-node.").tempdir()?;
        let from = dir.path().join("image/veil");
        image_tree(a, &from)?;
        let bin = dir.path().join("usr/bin");
        fs::create_dir_all(&bin)?;
        std::os::unix::fs::symlink(&a.qemu, bin.join("qemu-system-x86_64"))?;
        if let Some(c) = config {
            fs::create_dir_all(dir.path().join("etc/containerd"))?;
            fs::write(dir.path().join("etc/containerd/config.toml"), c)?;
        }
        Ok(NodeRoot { dir, from })
    }

    /// A path below the root.
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p.trim_start_matches('/'))
    }

    /// Runs `veil-node ARGS` against this root; each containerd restart
    /// appends a line to `restarts`.
    pub fn veil_node(&self, args: &[&str]) -> Result<Output> {
        let root = self.dir.path().display().to_string();
        let restart = format!("echo restart >> {}", self.path("restarts").display());
        Ok(Command::new(veil_node_bin()?)
            .args([
                "--root",
                &root,
                "--root-in-host",
                &root,
                "--restart-cmd",
                &restart,
            ])
            .args(args)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()?)
    }

    /// How often containerd was restarted.
    pub fn restarts(&self) -> usize {
        fs::read_to_string(self.path("restarts"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}
