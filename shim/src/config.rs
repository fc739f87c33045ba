//! The shim's configuration: `/etc/veil/config.toml` over compiled-in
//! defaults, with one section per handler (`veil`, `veil-sim`, `veil-snp`,
//! `veil-tdx`).
//!
//! Which file and which handler: containerd passes runtime options
//! (`runtimeoptions.v1.Options`) whose `ConfigPath` names the file, with an
//! optional `#HANDLER` suffix that picks the section — so each CRI handler
//! (RuntimeClass) points at its own section of one file:
//!
//! ```toml
//! [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.veil-sim.options]
//!   ConfigPath = "/etc/veil/config.toml#veil-sim"
//! ```
//!
//! `ctr run --runtime io.containerd.veil.v2 --runtime-config-path PATH#HANDLER`
//! does the same. Without options the file is `/etc/veil/config.toml` (if it
//! exists) and the handler is the file's `default_handler`. Every key is
//! documented in `docs/config.toml`, which is also checked by a test to parse
//! to exactly the compiled-in defaults.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};
use veil_common::{Classify, Kind};

use serde::{Deserialize, Serialize};

use crate::vmm::AccelChoice;

/// Where the config file is looked for when containerd names none.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/veil/config.toml";

/// The handlers veil knows out of the box.
pub const HANDLERS: &[&str] = &["veil", "veil-sim", "veil-snp", "veil-tdx"];

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// Config path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or bad values.
    #[error("invalid config {path}")]
    Parse {
        /// Config path.
        path: PathBuf,
        /// Parser error.
        #[source]
        source: toml::de::Error,
    },
    /// The handler has no section and is not built in.
    #[error("unknown handler '{0}' (no [handlers.{0}] section)")]
    UnknownHandler(String),
    /// The runtime options from containerd are malformed.
    #[error("malformed runtime options from containerd")]
    Options(#[source] protobuf::Error),
}

impl Classify for ConfigError {
    fn kind(&self) -> Kind {
        match self {
            ConfigError::Read { .. } | ConfigError::Parse { .. } => Kind::FailedPrecondition,
            ConfigError::UnknownHandler(_) | ConfigError::Options(_) => Kind::InvalidArgument,
        }
    }
}

/// Which TEE a handler's pods run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TeeKind {
    /// No TEE: a plain microVM.
    None,
    /// The simulated TEE (evidence from the shim's simulated firmware).
    Sim,
    /// AMD SEV-SNP (q35 + firmware, needs KVM and SNP host support).
    Snp,
    /// Intel TDX (q35 + firmware, needs KVM and TDX host support).
    Tdx,
}

/// How the host reaches the guest's vsock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VsockMode {
    /// Kernel vhost-vsock when `/dev/vhost-vsock` exists, hybrid otherwise.
    #[default]
    Auto,
    /// Always kernel vhost-vsock.
    Vhost,
    /// Always hybrid vsock through vhost-device-vsock.
    Hybrid,
}

/// Filesystem of the read-only container root images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootfsFormat {
    /// erofs (`mkfs.erofs`): compact, fast to build.
    #[default]
    Erofs,
    /// ext4 (`mkfs.ext4 -d`).
    Ext4,
}

impl RootfsFormat {
    /// The filesystem type the guest mounts.
    pub fn fstype(self) -> &'static str {
        match self {
            RootfsFormat::Erofs => "erofs",
            RootfsFormat::Ext4 => "ext4",
        }
    }
}

/// One handler's pod VM settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    /// TEE of the pods.
    pub tee: TeeKind,
    /// Guest kernel: `vmlinux` (PVH) for microvm, `bzImage` for SNP/TDX.
    pub kernel: PathBuf,
    /// Guest initrd with veil-agent as `/init`.
    pub initrd: PathBuf,
    /// Guest firmware (OVMF) for SNP/TDX; unused by microvm.
    pub firmware: PathBuf,
    /// Extra kernel command-line words, after the base line.
    pub kernel_params: String,
    /// vCPUs per pod VM.
    pub vcpus: u32,
    /// Guest RAM per pod VM, MiB.
    pub memory_mib: u32,
    /// `auto` (KVM canary, TCG fallback), `kvm` or `tcg`.
    pub accel: AccelChoice,
    /// `auto`, `vhost` or `hybrid`.
    pub vsock: VsockMode,
    /// First guest CID tried with kernel vhost-vsock.
    pub first_cid: u32,
    /// Filesystem of container root images: `erofs` or `ext4`.
    pub rootfs_format: RootfsFormat,
    /// How long the agent may take to answer after QEMU starts, ms.
    pub boot_timeout_ms: u64,
    /// Size of the pod's scratch disk in MiB (a sparse file the guest
    /// encrypts; container writable layers and emptyDir volumes live on it);
    /// 0 = none (writable layers in guest memory).
    pub scratch_disk_mib: u64,
    /// Check every block of the scratch disk (dm-integrity, tags in guest
    /// memory): a block the host changes or rolls back reads as an I/O
    /// error. TEE handlers put it on the measured command line
    /// (`veil.scratch=integrity`), so the host cannot turn it off.
    #[serde(default)]
    pub scratch_integrity: bool,
    /// Key broker `host:port` the shim relays the guest's connections to
    /// (vsock host port 1028); "" = no broker. TEE handlers only.
    #[serde(default)]
    pub kbs_address: String,
    /// The broker's TLS certificate, DER (`veil-kbs init-tls` writes
    /// `cert.der`). The guest pins it: its SHA-256 goes on the measured
    /// kernel command line. "" = no broker.
    #[serde(default)]
    pub kbs_cert: PathBuf,
    /// Resources the guest fetches after attesting, name → `repo/type/tag`
    /// (on the measured command line; the keys never leave the guest).
    #[serde(default)]
    pub kbs_resources: BTreeMap<String, String>,
    /// The simulated TEE's keys (`veil sim-ca init --dir`); `tee = "sim"` only.
    #[serde(default = "default_sim_ca_dir")]
    pub sim_ca_dir: PathBuf,
    /// Share host directories (hostPath, PVC filesystems, image volumes)
    /// with the pod through virtio-fs (`virtiofsd`, started with the VM).
    /// The host can read and change a shared directory: on by default for
    /// `veil` only; a confidential handler refuses such volumes unless this
    /// is set.
    #[serde(default)]
    pub shared_dirs: bool,
}

fn default_virtiofsd() -> PathBuf {
    "/opt/veil/bin/virtiofsd".into()
}

fn default_sim_ca_dir() -> PathBuf {
    "/opt/veil/sim-ca".into()
}

impl HandlerConfig {
    fn builtin(name: &str) -> Option<Self> {
        let base = HandlerConfig {
            tee: TeeKind::None,
            kernel: "/opt/veil/share/vmlinux".into(),
            initrd: "/opt/veil/share/veil-initrd.cpio".into(),
            firmware: PathBuf::new(),
            kernel_params: String::new(),
            vcpus: 1,
            memory_mib: 256,
            accel: AccelChoice::Auto,
            vsock: VsockMode::Auto,
            first_cid: 3,
            rootfs_format: RootfsFormat::Erofs,
            boot_timeout_ms: 60_000,
            // Sparse on the host: only what the pod writes takes space.
            scratch_disk_mib: 1024,
            scratch_integrity: false,
            kbs_address: String::new(),
            kbs_cert: PathBuf::new(),
            kbs_resources: BTreeMap::new(),
            sim_ca_dir: default_sim_ca_dir(),
            shared_dirs: true,
        };
        // Confidential handlers fetch the scratch disk's key and the image
        // policy (without it the host would choose the images' root hashes).
        let disk_key = BTreeMap::from([
            ("disk-key".to_string(), "default/key/disk".to_string()),
            (
                "image-policy".to_string(),
                "default/policy/images".to_string(),
            ),
        ]);
        let confidential = |tee| HandlerConfig {
            tee,
            kbs_resources: disk_key.clone(),
            kernel: "/opt/veil/share/bzImage".into(),
            firmware: "/opt/veil/share/OVMF.fd".into(),
            accel: AccelChoice::Kvm,
            vsock: VsockMode::Vhost,
            memory_mib: 512,
            shared_dirs: false,
            scratch_integrity: true,
            ..base.clone()
        };
        match name {
            "veil" => Some(base),
            "veil-sim" => Some(HandlerConfig {
                tee: TeeKind::Sim,
                kbs_resources: disk_key,
                shared_dirs: false,
                scratch_integrity: true,
                ..base
            }),
            "veil-snp" => Some(confidential(TeeKind::Snp)),
            "veil-tdx" => Some(confidential(TeeKind::Tdx)),
            _ => None,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Handler used when containerd's options name none.
    pub default_handler: String,
    /// Runtime state root: one directory per pod (`<state_dir>/<sandbox-id>`).
    pub state_dir: PathBuf,
    /// Where container root images are built and shared between pods
    /// (reference-counted; images no pod uses stay cached within
    /// `image_cache_mib`).
    pub image_dir: PathBuf,
    /// Disk space the image cache may take, MiB. While it takes more, the
    /// least recently used images that no pod uses are removed; images in
    /// use are never removed (a log line says when they alone exceed it).
    /// 0 = keep no image that no pod uses.
    pub image_cache_mib: u64,
    /// Where pods' scratch disks are (`<scratch_dir>/<sandbox-id>.img`,
    /// sparse, removed with the pod). Disk-backed: what a pod writes takes
    /// space here, and `state_dir` is usually a tmpfs.
    pub scratch_dir: PathBuf,
    /// QEMU binary.
    pub qemu: PathBuf,
    /// vhost-device-vsock binary (hybrid vsock).
    pub vhost_device_vsock: PathBuf,
    /// virtiofsd binary (host directories shared with `shared_dirs` pods).
    #[serde(default = "default_virtiofsd")]
    pub virtiofsd: PathBuf,
    /// `mkfs.erofs` binary.
    pub mkfs_erofs: PathBuf,
    /// `mkfs.ext4` binary.
    pub mkfs_ext4: PathBuf,
    /// Shim log filter (`tracing` syntax), e.g. `info` or `veil_shim=debug`.
    pub log_level: String,
    /// The jail of pods' QEMU and vsock backend (`[jail]`).
    #[serde(default)]
    pub jail: crate::jail::JailConfig,
    /// Per-handler settings; a section overrides the built-in defaults of the
    /// handler of the same name key by key.
    pub handlers: BTreeMap<String, HandlerConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default_handler: "veil".into(),
            state_dir: "/run/veil".into(),
            image_dir: "/var/lib/veil/images".into(),
            image_cache_mib: 4096,
            scratch_dir: "/var/lib/veil/scratch".into(),
            qemu: "qemu-system-x86_64".into(),
            vhost_device_vsock: "/opt/veil/bin/vhost-device-vsock".into(),
            virtiofsd: default_virtiofsd(),
            mkfs_erofs: "mkfs.erofs".into(),
            mkfs_ext4: "mkfs.ext4".into(),
            log_level: "info".into(),
            jail: crate::jail::JailConfig::default(),
            handlers: HANDLERS
                .iter()
                .filter_map(|h| HandlerConfig::builtin(h).map(|c| (h.to_string(), c)))
                .collect(),
        }
    }
}

impl Config {
    /// Parses a config file's text over the compiled-in defaults.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let parse_err = |source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        };
        let file: toml::Table = text.parse().map_err(parse_err)?;
        // Overlay the file on the defaults key by key (handlers field by field).
        let mut merged =
            toml::Table::try_from(Config::default()).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                source: serde::de::Error::custom(e),
            })?;
        for (k, v) in file {
            match (k.as_str(), v) {
                ("handlers", toml::Value::Table(handlers)) => {
                    let slot = merged
                        .entry("handlers")
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    if let toml::Value::Table(all) = slot {
                        for (name, section) in handlers {
                            let base = HandlerConfig::builtin(&name)
                                .and_then(|b| toml::Table::try_from(b).ok());
                            let entry = match (base, section) {
                                (Some(mut b), toml::Value::Table(over)) => {
                                    b.extend(over);
                                    toml::Value::Table(b)
                                }
                                (_, other) => other,
                            };
                            all.insert(name, entry);
                        }
                    }
                }
                (k, v) => {
                    merged.insert(k.to_string(), v);
                }
            }
        }
        merged.try_into().map_err(parse_err)
    }

    /// Reads `path`; a missing file at the default path gives the defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_toml(&text, path),
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && path == Path::new(DEFAULT_CONFIG_PATH) =>
            {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// The settings of `handler`.
    pub fn handler(&self, handler: &str) -> Result<&HandlerConfig, ConfigError> {
        self.handlers
            .get(handler)
            .ok_or_else(|| ConfigError::UnknownHandler(handler.to_string()))
    }
}

/// File in a pod's sandbox bundle recording which config and handler the pod
/// uses (for `delete`, which gets no runtime options).
pub const BUNDLE_CONFIG_FILE: &str = "veil-config";

/// Where the configuration comes from, as containerd's runtime options say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSource {
    /// The config file.
    pub path: PathBuf,
    /// The handler section, if the options name one.
    pub handler: Option<String>,
}

impl Default for ConfigSource {
    fn default() -> Self {
        ConfigSource {
            path: DEFAULT_CONFIG_PATH.into(),
            handler: None,
        }
    }
}

impl ConfigSource {
    /// From containerd's runtime options (`Any` of `runtimeoptions.v1.Options`:
    /// field 1 `type_url`, field 2 `config_path`). Other option types (runc's)
    /// are ignored.
    pub fn from_options(
        any: Option<&protobuf::well_known_types::any::Any>,
    ) -> Result<Self, ConfigError> {
        let Some(any) = any else {
            return Ok(Self::default());
        };
        if !any.type_url.ends_with("runtimeoptions.v1.Options") {
            return Ok(Self::default());
        }
        let path = config_path_field(&any.value).map_err(ConfigError::Options)?;
        Ok(Self::from_config_path(&path))
    }

    /// From a `ConfigPath` value, `PATH` or `PATH#HANDLER`.
    pub fn from_config_path(value: &str) -> Self {
        let (path, handler) = match value.rsplit_once('#') {
            Some((p, h)) => (p, Some(h.to_string()).filter(|h| !h.is_empty())),
            None => (value, None),
        };
        ConfigSource {
            path: if path.is_empty() {
                DEFAULT_CONFIG_PATH.into()
            } else {
                path.into()
            },
            handler,
        }
    }

    /// Records in `bundle` that its pod uses this config with `handler`.
    pub fn record(&self, bundle: &Path, handler: &str) -> std::io::Result<()> {
        std::fs::write(
            bundle.join(BUNDLE_CONFIG_FILE),
            format!("{}#{handler}", self.path.display()),
        )
    }

    /// What [`Self::record`] wrote in `bundle`, or the default.
    pub fn from_bundle(bundle: &Path) -> Self {
        std::fs::read_to_string(bundle.join(BUNDLE_CONFIG_FILE))
            .map(|s| Self::from_config_path(s.trim()))
            .unwrap_or_default()
    }

    /// Loads the file and picks the handler.
    pub fn load(&self) -> Result<(Config, String), ConfigError> {
        let config = Config::load(&self.path)?;
        let handler = self
            .handler
            .clone()
            .unwrap_or_else(|| config.default_handler.clone());
        config.handler(&handler)?;
        Ok((config, handler))
    }
}

/// Reads field 2 (`config_path`, a string) of a `runtimeoptions.v1.Options`.
fn config_path_field(bytes: &[u8]) -> Result<String, protobuf::Error> {
    let mut input = protobuf::CodedInputStream::from_bytes(bytes);
    let mut path = String::new();
    while let Some(tag) = input.read_raw_tag_or_eof()? {
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 2 && wire == 2 {
            path = input.read_string()?;
        } else {
            let wire_type = protobuf::rt::WireType::new(wire).ok_or_else(|| {
                protobuf::Error::from(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "bad wire type",
                ))
            })?;
            input.skip_field(wire_type)?;
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::well_known_types::any::Any;

    #[test]
    fn documented_example_parses_to_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(Config::from_toml(&text, &path).unwrap(), Config::default());
    }

    #[test]
    fn a_section_overrides_its_handler_key_by_key() {
        let c = Config::from_toml(
            "default_handler = \"veil-sim\"\n[handlers.veil-sim]\nvcpus = 2\nkernel = \"/k\"\n[handlers.custom]\ntee = \"none\"\nkernel = \"/a\"\ninitrd = \"/b\"\nfirmware = \"\"\nkernel_params = \"\"\nvcpus = 1\nmemory_mib = 128\naccel = \"tcg\"\nvsock = \"hybrid\"\nfirst_cid = 3\nrootfs_format = \"ext4\"\nboot_timeout_ms = 1000\nscratch_disk_mib = 0\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let sim = c.handler("veil-sim").unwrap();
        assert_eq!(
            (sim.vcpus, sim.kernel.as_path(), sim.tee),
            (2, Path::new("/k"), TeeKind::Sim)
        );
        assert_eq!(sim.memory_mib, 256, "untouched keys keep their default");
        assert_eq!(c.handler("veil").unwrap().vcpus, 1);
        assert_eq!(
            c.handler("custom").unwrap().rootfs_format,
            RootfsFormat::Ext4
        );
        assert_eq!(c.default_handler, "veil-sim");
    }

    #[test]
    fn unknown_keys_and_handlers_are_errors() {
        assert!(matches!(
            Config::from_toml("[handlers.veil]\nvcpu = 2\n", Path::new("t")),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::from_toml("colour = 1\n", Path::new("t")),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::default().handler("nope"),
            Err(ConfigError::UnknownHandler(_))
        ));
    }

    #[test]
    fn config_path_with_handler_suffix() {
        assert_eq!(
            ConfigSource::from_config_path("/etc/veil/config.toml#veil-sim"),
            ConfigSource {
                path: "/etc/veil/config.toml".into(),
                handler: Some("veil-sim".into())
            }
        );
        assert_eq!(ConfigSource::from_config_path("/x.toml").handler, None);
    }

    #[test]
    fn runtime_options_from_containerd() {
        // runtimeoptions.v1.Options{type_url: "x", config_path: "/c.toml#veil-sim"}
        let mut value = vec![0x0a, 1, b'x', 0x12, 16];
        value.extend_from_slice(b"/c.toml#veil-sim");
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        let src = ConfigSource::from_options(Some(&any)).unwrap();
        assert_eq!(src.path, PathBuf::from("/c.toml"));
        assert_eq!(src.handler.as_deref(), Some("veil-sim"));
        let runc = Any {
            type_url: "containerd.runc.v1.Options".into(),
            ..Default::default()
        };
        assert_eq!(
            ConfigSource::from_options(Some(&runc)).unwrap(),
            ConfigSource::default()
        );
        let bad = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: vec![0x12, 50, b'a'],
            ..Default::default()
        };
        assert!(ConfigSource::from_options(Some(&bad)).is_err());
    }
}
