//! Locating the built artefacts: guest kernel, initrds, QEMU, vhost-device-vsock.
//!
//! `ci/build-artefacts.sh` builds them (cached) and records their paths in
//! `$CARGO_TARGET_DIR/veil-artefacts.env` (default `target/`); an environment variable of the same name
//! overrides each entry.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// Paths of everything a VM test needs.
#[derive(Debug, Clone)]
pub struct Artefacts {
    /// Guest kernel, uncompressed (`vmlinux`).
    pub kernel: PathBuf,
    /// Initrd with veil-agent as `/init`.
    pub initrd: PathBuf,
    /// Initrd with the trivial floor `/init` (prints, powers off).
    pub floor_initrd: PathBuf,
    /// The statically linked agent binary.
    pub agent: PathBuf,
    /// `vhost-device-vsock`.
    pub vhost_device_vsock: PathBuf,
    /// virtiofsd (directory volumes of plain pods).
    pub virtiofsd: PathBuf,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The shim binary `containerd-shim-veil-v2` (empty if not recorded; see
    /// [`Artefacts::require_shim`]).
    pub shim: PathBuf,
    /// The key broker `veil-kbs` (empty if not recorded; see
    /// [`Artefacts::require_kbs`]).
    pub kbs: PathBuf,
    /// The operator CLI `veil` (empty if not recorded).
    pub veil_cli: PathBuf,
}

const HINT: &str =
    "run ci/build-artefacts.sh (ci/test.sh does) to build the guest kernel, initrd and tools";

impl Artefacts {
    /// Finds the artefacts, failing with a message that names what is missing.
    pub fn locate() -> Result<Self> {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::workspace_root().join("target"));
        let env_file = target.join("veil-artefacts.env");
        let recorded = read_env_file(&env_file).unwrap_or_default();
        let get = |key: &str| -> Result<PathBuf> {
            let v = std::env::var(key)
                .ok()
                .or_else(|| recorded.get(key).cloned())
                .with_context(|| {
                    format!(
                        "{key} is not set and not in {} — {HINT}",
                        env_file.display()
                    )
                })?;
            let p = PathBuf::from(v);
            if !p.is_file() {
                bail!("{key}={} does not exist — {HINT}", p.display());
            }
            Ok(p)
        };
        Ok(Artefacts {
            kernel: get("VEIL_KERNEL")?,
            initrd: get("VEIL_INITRD")?,
            floor_initrd: get("VEIL_FLOOR_INITRD")?,
            agent: get("VEIL_AGENT")?,
            vhost_device_vsock: get("VEIL_VHOST_DEVICE_VSOCK")?,
            virtiofsd: get("VEIL_VIRTIOFSD")?,
            qemu: get("VEIL_QEMU")?,
            shim: get("VEIL_SHIM").unwrap_or_default(),
            kbs: get("VEIL_KBS").unwrap_or_default(),
            veil_cli: get("VEIL_CLI").unwrap_or_default(),
        })
    }

    /// The shim binary, failing with a hint when it was not built.
    pub fn require_shim(&self) -> Result<&Path> {
        if self.shim.is_file() {
            Ok(&self.shim)
        } else {
            bail!("VEIL_SHIM (containerd-shim-veil-v2) is not built — {HINT}")
        }
    }

    /// The key broker binary, failing with a hint when it was not built.
    pub fn require_kbs(&self) -> Result<&Path> {
        if self.kbs.is_file() {
            Ok(&self.kbs)
        } else {
            bail!("VEIL_KBS (veil-kbs) is not built — {HINT}")
        }
    }

    /// The `veil` CLI, failing with a hint when it was not built.
    pub fn require_veil_cli(&self) -> Result<&Path> {
        if self.veil_cli.is_file() {
            Ok(&self.veil_cli)
        } else {
            bail!("VEIL_CLI (veil) is not built — {HINT}")
        }
    }
}

fn read_env_file(path: &Path) -> Option<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
    )
}
