//! Matching requests against a [`Policy`]: what of a CreateContainer or an
//! exec the policy looks at ([`ContainerView`], [`ExecView`], taken from the
//! same parsed OCI types the engine runs), and the one denial type.
//!
//! Every check is an exact comparison or a set lookup, so a request is
//! evaluated in time linear in its size and the policy's.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{ContainerRule, Containers, EnvName, Policy};
use veil_common::{Classify, Kind};

/// A request the policy refused: which request, which field, which rule.
/// Never carries an environment value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{request} denied by the {policy}: {field} {detail}{}", rule_suffix(.rule))]
pub struct Denied {
    /// The request (`ExecProcess`, `CreateContainer`...).
    pub request: &'static str,
    /// Which policy (built-in, init-data).
    pub policy: &'static str,
    /// The request field that failed (`process.args`).
    pub field: String,
    /// What about it.
    pub detail: String,
    /// The rule that was closest, if any.
    pub rule: Option<String>,
}

fn rule_suffix(rule: &Option<String>) -> String {
    match rule {
        Some(r) => format!(" (rule '{r}')"),
        None => String::new(),
    }
}

impl Classify for Denied {
    fn kind(&self) -> Kind {
        Kind::PermissionDenied
    }
}

/// What the policy checks of a container to be created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerView {
    /// `process.args`.
    pub args: Vec<String>,
    /// `process.env`.
    pub env: Vec<String>,
    /// `process.cwd`.
    pub cwd: String,
    /// `process.terminal`.
    pub terminal: bool,
    /// Whether the host attaches stdin.
    pub stdin: bool,
    /// Every capability of any set.
    pub capabilities: BTreeSet<String>,
    /// `mounts`.
    pub mounts: Vec<MountView>,
    /// `linux.devices` paths.
    pub devices: Vec<String>,
    /// `linux.namespaces` types.
    pub namespaces: BTreeSet<String>,
    /// dm-verity root hash of the rootfs storage; `None`: not verity.
    pub root_hash: Option<String>,
    /// The container's name in its pod (containerd's CRI annotation), when
    /// it has one.
    pub name: Option<String>,
}

/// containerd's CRI annotation naming a container in its pod.
pub const CRI_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";

/// One mount of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountView {
    /// Destination.
    pub destination: String,
    /// Type.
    pub kind: String,
    /// Source.
    pub source: String,
    /// A bind mount (`bind`/`rbind` option or type).
    pub bind: bool,
}

/// What the policy checks of an exec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecView {
    /// `args`.
    pub args: Vec<String>,
    /// `env`.
    pub env: Vec<String>,
    /// `terminal`.
    pub terminal: bool,
    /// Whether the host attaches stdin.
    pub stdin: bool,
    /// Capabilities asked for (empty: the container's).
    pub capabilities: BTreeSet<String>,
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn caps(process: &Value) -> BTreeSet<String> {
    let c = &process["capabilities"];
    [
        "bounding",
        "effective",
        "permitted",
        "inheritable",
        "ambient",
    ]
    .iter()
    .flat_map(|k| strs(&c[*k]))
    .collect()
}

impl ContainerView {
    /// The view of a parsed OCI spec.
    pub fn of(spec: &oci_spec::runtime::Spec, stdin: bool, root_hash: Option<String>) -> Self {
        let v = serde_json::to_value(spec).unwrap_or(Value::Null);
        let p = &v["process"];
        let mounts = v["mounts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| {
                        let kind = m["type"].as_str().unwrap_or("").to_string();
                        let opts = strs(&m["options"]);
                        MountView {
                            destination: m["destination"].as_str().unwrap_or("").to_string(),
                            source: m["source"].as_str().unwrap_or("").to_string(),
                            bind: kind == "bind"
                                || opts.iter().any(|o| o == "bind" || o == "rbind"),
                            kind,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let linux = &v["linux"];
        ContainerView {
            args: strs(&p["args"]),
            env: strs(&p["env"]),
            cwd: p["cwd"].as_str().unwrap_or("/").to_string(),
            terminal: p["terminal"].as_bool().unwrap_or(false),
            stdin,
            capabilities: caps(p),
            mounts,
            devices: linux["devices"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d["path"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            namespaces: linux["namespaces"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|n| n["type"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            root_hash,
            name: v["annotations"][CRI_CONTAINER_NAME]
                .as_str()
                .map(str::to_string),
        }
    }
}

impl ExecView {
    /// The view of a parsed OCI process.
    pub fn of(process: &oci_spec::runtime::Process, stdin: bool) -> Self {
        let p = serde_json::to_value(process).unwrap_or(Value::Null);
        ExecView {
            args: strs(&p["args"]),
            env: strs(&p["env"]),
            terminal: p["terminal"].as_bool().unwrap_or(false),
            stdin,
            capabilities: caps(&p),
        }
    }
}

/// Kernel filesystems every container may have at their usual places.
const KERNEL_MOUNTS: &[(&str, &[&str])] = &[
    ("/proc", &["proc"]),
    ("/dev", &["tmpfs"]),
    ("/dev/pts", &["devpts"]),
    ("/dev/shm", &["tmpfs"]),
    ("/dev/mqueue", &["mqueue"]),
    ("/sys", &["sysfs"]),
    ("/sys/fs/cgroup", &["cgroup", "cgroup2"]),
    ("/run", &["tmpfs"]),
];

/// The pod's files every container may have (sources `sandbox:NAME`).
const SANDBOX_FILES: &[&str] = &["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"];

/// Namespaces a container must have (created or the pod's).
const REQUIRED_NAMESPACES: &[&str] = &["mount", "pid", "ipc", "uts"];

fn shown(v: &[String]) -> String {
    let s = serde_json::to_string(v).unwrap_or_default();
    if s.len() > 256 {
        format!("{}…", s.chars().take(256).collect::<String>())
    } else {
        s
    }
}

/// A rule's first mismatch: how far the rule matched, and what failed.
struct Mismatch {
    depth: u8,
    field: &'static str,
    detail: String,
}

fn env_allowed(rule: &ContainerRule, entry: &str) -> bool {
    if rule.env.contains(entry) {
        return true;
    }
    let name = entry.split_once('=').map(|(n, _)| n).unwrap_or(entry);
    rule.env_names.iter().any(|n| match n {
        EnvName::Exact(e) => e == name,
        EnvName::Prefix(p) => name.starts_with(p.as_str()),
    })
}

fn env_check(rule: &ContainerRule, env: &[String]) -> Result<(), String> {
    for e in env {
        if !env_allowed(rule, e) {
            let name: String = e
                .split('=')
                .next()
                .unwrap_or("")
                .chars()
                .take(128)
                .collect();
            return Err(format!(
                "has variable '{name}' with a value the rule does not allow (values are not shown)"
            ));
        }
    }
    Ok(())
}

fn caps_check(rule: &ContainerRule, caps: &BTreeSet<String>) -> Result<(), String> {
    match caps.iter().find(|c| !rule.capabilities.contains(*c)) {
        Some(c) => Err(format!("has {c}, which the rule does not allow")),
        None => Ok(()),
    }
}

fn mount_allowed(rule: &ContainerRule, m: &MountView) -> bool {
    if rule.mounts.contains(&m.destination) {
        return true;
    }
    if !m.bind
        && KERNEL_MOUNTS
            .iter()
            .any(|(d, kinds)| *d == m.destination && kinds.contains(&m.kind.as_str()))
    {
        return true;
    }
    SANDBOX_FILES.contains(&m.destination.as_str()) && m.source.starts_with("sandbox:")
}

fn match_rule(rule: &ContainerRule, c: &ContainerView) -> Result<(), Mismatch> {
    let miss = |depth, field, detail: String| Mismatch {
        depth,
        field,
        detail,
    };
    if !rule.root_hashes.is_empty() {
        match &c.root_hash {
            Some(h) if rule.root_hashes.contains(h) => {}
            Some(h) => {
                return Err(miss(
                    0,
                    "rootfs image",
                    format!("has dm-verity root hash {h}, which the rule does not list"),
                ))
            }
            None => {
                return Err(miss(
                    0,
                    "rootfs image",
                    "is not dm-verity protected, and the rule names root hashes".into(),
                ))
            }
        }
    }
    if c.args != rule.args {
        return Err(miss(
            1,
            "process.args",
            format!(
                "{} differ from the rule's {}",
                shown(&c.args),
                shown(&rule.args)
            ),
        ));
    }
    if let Some(cwd) = &rule.cwd {
        if &c.cwd != cwd {
            return Err(miss(
                2,
                "process.cwd",
                format!("'{}' is not '{cwd}'", c.cwd),
            ));
        }
    }
    env_check(rule, &c.env).map_err(|d| miss(3, "process.env", d))?;
    if let Some(m) = c.mounts.iter().find(|m| !mount_allowed(rule, m)) {
        return Err(miss(
            4,
            "mounts",
            format!(
                "has {} mount at '{}', a destination the rule does not list",
                if m.bind { "a bind" } else { "a" },
                m.destination
            ),
        ));
    }
    caps_check(rule, &c.capabilities).map_err(|d| miss(5, "process.capabilities", d))?;
    if let Some(d) = c.devices.iter().find(|d| !rule.devices.contains(*d)) {
        return Err(miss(
            6,
            "linux.devices",
            format!("has '{d}', which the rule does not list"),
        ));
    }
    for ns in REQUIRED_NAMESPACES {
        if !c.namespaces.contains(*ns) && !rule.guest_namespaces.contains(*ns) {
            return Err(miss(
                7,
                "linux.namespaces",
                format!("lack a {ns} namespace: the container would share the guest's"),
            ));
        }
    }
    if c.terminal && !rule.terminal {
        return Err(miss(
            8,
            "process.terminal",
            "is set; the rule allows no terminal".into(),
        ));
    }
    if c.stdin && !rule.stdin {
        return Err(miss(
            9,
            "stdio.stdin",
            "is attached; the rule allows no stdin".into(),
        ));
    }
    Ok(())
}

impl Policy {
    /// Checks a container to be created; returns the index of the rule it
    /// matched (`None` under a built-in policy).
    pub fn check_container(&self, c: &ContainerView) -> Result<Option<usize>, Denied> {
        let rules = match &self.containers {
            Containers::Any { .. } => return Ok(None),
            Containers::Rules(r) => r,
        };
        // A container named like a rule is held to that rule (and so gets
        // its exec allowlist); others may match any rule.
        let named = c
            .name
            .as_ref()
            .and_then(|n| rules.iter().position(|r| &r.name == n));
        let mut best: Option<(usize, Mismatch)> = None;
        for (i, rule) in rules.iter().enumerate() {
            if named.is_some_and(|n| n != i) {
                continue;
            }
            match match_rule(rule, c) {
                Ok(()) => return Ok(Some(i)),
                Err(m) => {
                    if best.as_ref().is_none_or(|(_, b)| m.depth > b.depth) {
                        best = Some((i, m));
                    }
                }
            }
        }
        Err(match best {
            Some((i, m)) => Denied {
                request: "CreateContainer",
                policy: self.source,
                field: m.field.into(),
                detail: m.detail,
                rule: Some(rules[i].name.clone()),
            },
            None => Denied {
                request: "CreateContainer",
                policy: self.source,
                field: "container".into(),
                detail: "matches no rule: the policy allows no containers".into(),
                rule: None,
            },
        })
    }

    /// Checks an exec in a container that matched rule `rule` at creation.
    pub fn check_exec(&self, rule: Option<usize>, e: &ExecView) -> Result<(), Denied> {
        let deny = |field: &str, detail: String, rule: Option<String>| Denied {
            request: "ExecProcess",
            policy: self.source,
            field: field.into(),
            detail,
            rule,
        };
        let r = match (&self.containers, rule) {
            (Containers::Any { exec: true }, _) => return Ok(()),
            (Containers::Any { exec: false }, _) => {
                return Err(deny(
                    "process.args",
                    format!(
                    "{}: exec is not allowed in a confidential pod without a policy that lists it",
                    shown(&e.args)
                ),
                    None,
                ))
            }
            (Containers::Rules(rules), Some(i)) => match rules.get(i) {
                Some(r) => r,
                None => return Err(deny("container_id", "has no rule".into(), None)),
            },
            (Containers::Rules(_), None) => {
                return Err(deny(
                    "container_id",
                    "was not created under this policy".into(),
                    None,
                ))
            }
        };
        let name = Some(r.name.clone());
        let Some(x) = r.exec.iter().find(|x| x.args == e.args) else {
            return Err(deny(
                "process.args",
                format!(
                    "{} is not in the rule's exec allowlist ({} command{})",
                    shown(&e.args),
                    r.exec.len(),
                    if r.exec.len() == 1 { "" } else { "s" }
                ),
                name,
            ));
        };
        if e.terminal && !x.terminal {
            return Err(deny(
                "process.terminal",
                "is set; this exec allows no terminal".into(),
                name,
            ));
        }
        if e.stdin && !x.stdin {
            return Err(deny(
                "stdio.stdin",
                "is attached; this exec allows no stdin".into(),
                name,
            ));
        }
        env_check(r, &e.env).map_err(|d| deny("process.env", d, name.clone()))?;
        caps_check(r, &e.capabilities)
            .map_err(|d| deny("process.capabilities", d, name.clone()))?;
        Ok(())
    }

    /// Checks an API call that is allowed or not as a whole.
    pub fn check_call(
        &self,
        request: &'static str,
        allowed: bool,
        what: &str,
    ) -> Result<(), Denied> {
        if allowed {
            return Ok(());
        }
        Err(Denied {
            request,
            policy: self.source,
            field: "request".into(),
            detail: format!("is not allowed: {what}"),
            rule: Some(format!("api.{}", api_key(request))),
        })
    }

    /// Checks a signal number.
    pub fn check_signal(&self, signal: u32) -> Result<(), Denied> {
        match &self.api.signals {
            None => Ok(()),
            Some(s) if i32::try_from(signal).is_ok_and(|n| s.contains(&n)) => Ok(()),
            Some(_) => Err(Denied {
                request: "SignalProcess",
                policy: self.source,
                field: "signal".into(),
                detail: format!("{signal} is not in the allowed signals"),
                rule: Some("api.signals".into()),
            }),
        }
    }
}

fn api_key(request: &str) -> &'static str {
    match request {
        "ReadVolumeFile" => "read_volume_file",
        "PutVolume" => "put_volume",
        "PauseContainer" | "ResumeContainer" => "pause",
        "UpdateContainer" => "update",
        "StatsContainer" | "ListPids" => "stats",
        "PortForward" => "port_forward",
        _ => "read_output",
    }
}
