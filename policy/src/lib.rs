//! The pod's request policy: what the host may ask the agent to do. Checked
//! on every agent request before anything is acted on; see
//! `docs/policy.md` for the format and the defaults per handler.
//!
//! The policy is a small TOML document with exact-match semantics: no
//! expressions, no loops, no references — a request is allowed when one
//! rule's fields all equal (or contain) the request's. Parsing is bounded by
//! [`MAX_POLICY_BYTES`] and the list limits below, so evaluation is bounded
//! by (rules × fields × list lengths) and needs no interpreter.
//!
//! ```toml
//! version = 1
//! [api]
//! signals = ["TERM", "KILL"]
//! [[container]]
//! name = "app"
//! root_hash = ["<64 hex>"]
//! args = ["/bin/sleep", "3600"]
//! env = ["PATH=/usr/bin:/bin"]
//! env_names = ["HOSTNAME", "KUBERNETES_*"]
//! mounts = ["/data"]
//! [[container.exec]]
//! args = ["cat", "/proc/loadavg"]
//! ```
//!
//! Module map: this file (the document, its limits, the built-in policies),
//! [`eval`] (matching requests against rules). The agent's `policy::gate`
//! holds the pod's policy state; the `veil policy` commands write and
//! explain policies with the same code.

pub mod eval;
#[cfg(feature = "generate")]
pub mod generate;

use std::collections::BTreeSet;

use serde::Deserialize;

use veil_common::{Classify, Kind};

/// Largest policy document accepted, bytes.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
/// Most `[[container]]` rules.
pub const MAX_CONTAINERS: usize = 64;
/// Most `[[container.exec]]` rules per container.
pub const MAX_EXECS: usize = 64;
/// Most entries in any one list (args, env, mounts...).
pub const MAX_LIST: usize = 512;
/// Longest string in a policy.
pub const MAX_STRING: usize = 4096;

/// The one format version this agent reads.
pub const VERSION: u32 = 1;

/// Capabilities a container gets when its rule does not list any:
/// containerd's default set.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// A policy document that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyDocError {
    /// Larger than [`MAX_POLICY_BYTES`].
    #[error("policy is {0} bytes, more than the {MAX_POLICY_BYTES} allowed")]
    TooLarge(usize),
    /// Not UTF-8 TOML of the expected shape.
    #[error("policy is not valid: {0}")]
    Syntax(String),
    /// Another version than [`VERSION`].
    #[error("policy version {0} is not supported (this agent reads version {VERSION})")]
    Version(u32),
    /// A list or string over its limit.
    #[error("policy {field} has {len} entries or bytes, more than the {max} allowed")]
    Limit {
        /// Which field.
        field: String,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A value that does not mean anything.
    #[error("policy {field}: {reason}")]
    Value {
        /// Which field.
        field: String,
        /// Why.
        reason: String,
    },
}

impl Classify for PolicyDocError {
    fn kind(&self) -> Kind {
        Kind::InvalidArgument
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    version: u32,
    #[serde(default)]
    api: ApiDoc,
    #[serde(default)]
    container: Vec<ContainerDoc>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ApiDoc {
    read_output: Option<bool>,
    port_forward: Option<bool>,
    read_volume_file: Option<bool>,
    put_volume: Option<bool>,
    pause: Option<bool>,
    update: Option<bool>,
    stats: Option<bool>,
    signals: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerDoc {
    name: String,
    #[serde(default)]
    root_hash: Vec<String>,
    args: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    env_names: Vec<String>,
    cwd: Option<String>,
    #[serde(default)]
    mounts: Vec<String>,
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    devices: Vec<String>,
    #[serde(default)]
    guest_namespaces: Vec<String>,
    #[serde(default)]
    stdin: bool,
    #[serde(default)]
    terminal: bool,
    #[serde(default)]
    exec: Vec<ExecDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecDoc {
    args: Vec<String>,
    #[serde(default)]
    stdin: bool,
    #[serde(default)]
    terminal: bool,
}

/// Calls other than creating containers and exec: what the host may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Api {
    /// Attach the containers' stdout, stderr and terminal output.
    pub read_output: bool,
    /// CRI PortForward: connections from the host to ports on the pod's
    /// localhost (services the workload did not put on its network).
    pub port_forward: bool,
    /// ReadVolumeFile: read a file volume back.
    pub read_volume_file: bool,
    /// PutVolume: copy file volumes (which containers see them is decided
    /// by their rules' `mounts`).
    pub put_volume: bool,
    /// PauseContainer / ResumeContainer.
    pub pause: bool,
    /// UpdateContainer (resources).
    pub update: bool,
    /// StatsContainer and ListPids.
    pub stats: bool,
    /// Signal numbers the host may send; `None`: any.
    pub signals: Option<BTreeSet<i32>>,
}

impl Api {
    fn all() -> Self {
        Api {
            read_output: true,
            port_forward: true,
            read_volume_file: true,
            put_volume: true,
            pause: true,
            update: true,
            stats: true,
            signals: None,
        }
    }

    /// Defaults of a confidential pod: every call. None of them reveals
    /// what the pod holds: output and termination messages are what the
    /// workload chooses to write for the host, file volumes come from the
    /// host, and stopping or starving a pod is always in the host's power.
    /// Port-forward is the exception: it reaches services bound to the
    /// pod's localhost, which the workload kept off its network.
    fn confidential() -> Self {
        Api {
            port_forward: false,
            ..Api::all()
        }
    }
}

/// An environment variable rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvName {
    /// Exactly this name, any value.
    Exact(String),
    /// Any name starting with this, any value (`KUBERNETES_*`).
    Prefix(String),
}

/// What one container may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRule {
    /// The rule's name, shown in denials.
    pub name: String,
    /// Allowed dm-verity root hashes of its image (lowercase hex); empty: any.
    pub root_hashes: BTreeSet<String>,
    /// Exact `process.args`.
    pub args: Vec<String>,
    /// Allowed `NAME=VALUE` entries, exactly.
    pub env: BTreeSet<String>,
    /// Names allowed with any value.
    pub env_names: Vec<EnvName>,
    /// Required `process.cwd`; `None`: any.
    pub cwd: Option<String>,
    /// Mount destinations allowed besides the standard ones.
    pub mounts: BTreeSet<String>,
    /// Allowed capabilities (in every set).
    pub capabilities: BTreeSet<String>,
    /// Allowed `linux.devices` paths.
    pub devices: BTreeSet<String>,
    /// Namespaces (pid, ipc, uts) the container may share with the guest.
    pub guest_namespaces: BTreeSet<String>,
    /// Whether the host may attach its stdin.
    pub stdin: bool,
    /// Whether it may have a terminal.
    pub terminal: bool,
    /// The exec'd commands allowed in it.
    pub exec: Vec<ExecRule>,
}

/// One allowed exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRule {
    /// Exact `args`.
    pub args: Vec<String>,
    /// Whether stdin may be attached.
    pub stdin: bool,
    /// Whether it may have a terminal.
    pub terminal: bool,
}

/// Which containers may be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Containers {
    /// Any container (the built-in policies); exec allowed or not.
    Any {
        /// Whether exec is allowed.
        exec: bool,
    },
    /// Only those a rule allows.
    Rules(Vec<ContainerRule>),
}

/// A parsed policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Where the policy comes from, for denials: `built-in allow-all`,
    /// `built-in confidential default`, or `init-data`.
    pub source: &'static str,
    /// The API calls.
    pub api: Api,
    /// The containers.
    pub containers: Containers,
}

impl Policy {
    /// The plain `veil` handler's policy: everything (it promises no
    /// confidentiality).
    pub fn allow_all() -> Self {
        Policy {
            source: "built-in allow-all policy",
            api: Api::all(),
            containers: Containers::Any { exec: true },
        }
    }

    /// A confidential pod launched without a policy: any container, no exec.
    pub fn confidential_default() -> Self {
        Policy {
            source: "built-in confidential default policy",
            api: Api::confidential(),
            containers: Containers::Any { exec: false },
        }
    }

    /// Parses a policy document (what the init-data carries).
    pub fn parse(bytes: &[u8]) -> Result<Self, PolicyDocError> {
        if bytes.len() > MAX_POLICY_BYTES {
            return Err(PolicyDocError::TooLarge(bytes.len()));
        }
        let text =
            std::str::from_utf8(bytes).map_err(|_| PolicyDocError::Syntax("not UTF-8".into()))?;
        let doc: Doc = toml::from_str(text).map_err(|e| {
            PolicyDocError::Syntax(e.message().chars().take(512).collect::<String>())
        })?;
        if doc.version != VERSION {
            return Err(PolicyDocError::Version(doc.version));
        }
        limit("container", doc.container.len(), MAX_CONTAINERS)?;
        let mut api = Api::confidential();
        let a = doc.api;
        let set = |v: Option<bool>, d: bool| v.unwrap_or(d);
        api.read_output = set(a.read_output, api.read_output);
        api.port_forward = set(a.port_forward, api.port_forward);
        api.read_volume_file = set(a.read_volume_file, api.read_volume_file);
        api.put_volume = set(a.put_volume, api.put_volume);
        api.pause = set(a.pause, api.pause);
        api.update = set(a.update, api.update);
        api.stats = set(a.stats, api.stats);
        if let Some(s) = a.signals {
            strings("api.signals", &s)?;
            api.signals = Some(
                s.iter()
                    .map(|n| signal_number(n))
                    .collect::<Result<_, _>>()?,
            );
        }
        let mut names = BTreeSet::new();
        let mut rules = Vec::new();
        for c in doc.container {
            let rule = container_rule(c)?;
            if !names.insert(rule.name.clone()) {
                return Err(PolicyDocError::Value {
                    field: "container.name".into(),
                    reason: format!("'{}' is used twice", rule.name),
                });
            }
            rules.push(rule);
        }
        Ok(Policy {
            source: "init-data policy",
            api,
            containers: Containers::Rules(rules),
        })
    }
}

fn limit(field: &str, len: usize, max: usize) -> Result<(), PolicyDocError> {
    if len > max {
        return Err(PolicyDocError::Limit {
            field: field.to_string(),
            len,
            max,
        });
    }
    Ok(())
}

fn strings(field: &str, v: &[String]) -> Result<(), PolicyDocError> {
    limit(field, v.len(), MAX_LIST)?;
    for s in v {
        limit(field, s.len(), MAX_STRING)?;
    }
    Ok(())
}

/// A signal by name (`TERM`, `SIGTERM`) or number.
fn signal_number(s: &str) -> Result<i32, PolicyDocError> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
    }
    let name = if s.starts_with("SIG") {
        s.to_string()
    } else {
        format!("SIG{s}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| PolicyDocError::Value {
            field: "api.signals".into(),
            reason: format!("'{s}' is not a signal"),
        })
}

fn container_rule(c: ContainerDoc) -> Result<ContainerRule, PolicyDocError> {
    let f = |n: &str| {
        format!(
            "container '{}' {n}",
            c.name.chars().take(64).collect::<String>()
        )
    };
    limit("container.name", c.name.len(), 128)?;
    if c.name.is_empty() {
        return Err(PolicyDocError::Value {
            field: "container.name".into(),
            reason: "is empty".into(),
        });
    }
    for (n, v) in [
        ("root_hash", &c.root_hash),
        ("args", &c.args),
        ("env", &c.env),
        ("env_names", &c.env_names),
        ("mounts", &c.mounts),
        ("devices", &c.devices),
        ("guest_namespaces", &c.guest_namespaces),
    ] {
        strings(&f(n), v)?;
    }
    if c.args.is_empty() {
        return Err(PolicyDocError::Value {
            field: f("args"),
            reason: "is empty".into(),
        });
    }
    let mut root_hashes = BTreeSet::new();
    for h in &c.root_hash {
        match hex::decode(h) {
            Ok(b) if matches!(b.len(), 32 | 64) => {
                root_hashes.insert(hex::encode(b));
            }
            _ => {
                return Err(PolicyDocError::Value {
                    field: f("root_hash"),
                    reason: format!("'{h}' is not 32 or 64 bytes of hex"),
                })
            }
        }
    }
    for e in &c.env {
        if !e.contains('=') {
            return Err(PolicyDocError::Value {
                field: f("env"),
                reason: format!("'{e}' is not NAME=VALUE (use env_names for any value)"),
            });
        }
    }
    let env_names = c
        .env_names
        .iter()
        .map(|n| match n.strip_suffix('*') {
            Some(p) if !p.contains('*') => Ok(EnvName::Prefix(p.to_string())),
            None if !n.is_empty() && !n.contains(['*', '=']) => Ok(EnvName::Exact(n.clone())),
            _ => Err(PolicyDocError::Value {
                field: f("env_names"),
                reason: format!("'{n}' is not NAME or PREFIX*"),
            }),
        })
        .collect::<Result<_, _>>()?;
    for p in c.mounts.iter().chain(&c.devices) {
        if !p.starts_with('/') || p.split('/').any(|s| s == "..") {
            return Err(PolicyDocError::Value {
                field: f("mounts/devices"),
                reason: format!("'{p}' is not an absolute path"),
            });
        }
    }
    for n in &c.guest_namespaces {
        if !matches!(n.as_str(), "pid" | "ipc" | "uts") {
            return Err(PolicyDocError::Value {
                field: f("guest_namespaces"),
                reason: format!("'{n}' is not pid, ipc or uts"),
            });
        }
    }
    let capabilities = match c.capabilities {
        Some(v) => {
            strings(&f("capabilities"), &v)?;
            v.iter()
                .map(|s| {
                    let s = s.to_ascii_uppercase();
                    if s.starts_with("CAP_") {
                        s
                    } else {
                        format!("CAP_{s}")
                    }
                })
                .collect()
        }
        None => DEFAULT_CAPABILITIES.iter().map(|s| s.to_string()).collect(),
    };
    limit(&f("exec"), c.exec.len(), MAX_EXECS)?;
    let mut exec = Vec::new();
    for e in c.exec {
        strings(&f("exec.args"), &e.args)?;
        if e.args.is_empty() {
            return Err(PolicyDocError::Value {
                field: f("exec.args"),
                reason: "is empty".into(),
            });
        }
        exec.push(ExecRule {
            args: e.args,
            stdin: e.stdin,
            terminal: e.terminal,
        });
    }
    Ok(ContainerRule {
        name: c.name,
        root_hashes,
        args: c.args,
        env: c.env.into_iter().collect(),
        env_names,
        cwd: c.cwd,
        mounts: c.mounts.into_iter().collect(),
        capabilities,
        devices: c.devices.into_iter().collect(),
        guest_namespaces: c.guest_namespaces.into_iter().collect(),
        stdin: c.stdin,
        terminal: c.terminal,
        exec,
    })
}
