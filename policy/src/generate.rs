//! Writing a policy from a Kubernetes pod manifest (`veil policy generate`):
//! one `[[container]]` rule per container as the CRI plugin will create it
//! (command and arguments resolved as containerd resolves them, the
//! manifest's environment, its volume mounts and what kubelet and
//! containerd add), one for the pod's pause container, and the exec
//! allowlist the operator asks for.
//!
//! What a manifest does not say is not guessed: a container without a
//! `command` needs its image's config (`--image-config`), every image needs
//! its dm-verity root hash, and a value that only exists at run time (a
//! secret, a field reference) is allowed by name, never by value — and each
//! such choice is reported as a note next to the document.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, Pod};
use serde::Deserialize;

use crate::{Policy, DEFAULT_CAPABILITIES};

/// The pause image of a pod sandbox when the operator names none.
pub const DEFAULT_PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.9";
/// The pause container's rule name.
pub const PAUSE_RULE: &str = "pause";

/// Why a policy could not be written.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The manifest is not a Pod.
    #[error("the manifest is not a Kubernetes Pod: {0}")]
    Manifest(String),
    /// Something the policy needs that the inputs do not give.
    #[error("{0}")]
    Missing(String),
    /// A pod veil will not write a policy for.
    #[error("{0}")]
    Refused(String),
    /// The written document does not parse back (a bug).
    #[error("the generated policy does not parse: {0}")]
    Invalid(#[from] crate::PolicyDocError),
}

/// The part of an OCI image config a rule needs (`config` of the image's
/// config JSON, or that object itself).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    /// `Entrypoint`.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// `Env`.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// `WorkingDir`.
    #[serde(default)]
    pub working_dir: Option<String>,
}

impl ImageConfig {
    /// Reads an image config JSON: the whole config (`{"config": {...}}`)
    /// or just its `config` object.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Whole {
            config: ImageConfig,
        }
        if let Ok(w) = serde_json::from_slice::<Whole>(bytes) {
            return Ok(w.config);
        }
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// What the policy is written from besides the manifest.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Image reference → dm-verity root hash (hex).
    pub root_hashes: BTreeMap<String, String>,
    /// Image reference → its config.
    pub image_configs: BTreeMap<String, ImageConfig>,
    /// Container name → exact commands the host may exec in it.
    pub exec: BTreeMap<String, Vec<Vec<String>>>,
    /// The pod's pause image.
    pub pause_image: String,
}

/// A written policy.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The TOML document.
    pub document: String,
    /// What the operator should know: choices made where the manifest said
    /// nothing exact.
    pub notes: Vec<String>,
}

/// Parses a pod manifest, YAML or JSON.
pub fn parse_pod(text: &str) -> Result<Pod, GenerateError> {
    let pod: Pod = serde_yaml_ng::from_str(text).map_err(|e| {
        GenerateError::Manifest(e.to_string().chars().take(512).collect::<String>())
    })?;
    Ok(pod)
}

fn toml_list(v: &[String]) -> String {
    let items: Vec<String> = v
        .iter()
        .map(|s| toml::Value::String(s.clone()).to_string())
        .collect();
    format!("[{}]", items.join(", "))
}

fn root_hash(inputs: &Inputs, image: &str, who: &str) -> Result<String, GenerateError> {
    let h = inputs.root_hashes.get(image).ok_or_else(|| {
        GenerateError::Missing(format!(
            "{who} runs image '{image}', whose dm-verity root hash was not given (--root-hash '{image}=<hex>')"
        ))
    })?;
    match hex::decode(h) {
        Ok(b) if matches!(b.len(), 32 | 64) => Ok(hex::encode(b)),
        _ => Err(GenerateError::Missing(format!(
            "the root hash given for '{image}' is not 32 or 64 bytes of hex"
        ))),
    }
}

/// `process.args` as containerd's CRI plugin builds them: the manifest's
/// `command` replaces the image's entrypoint (and drops its cmd), `args`
/// replaces the image's cmd.
fn container_args(c: &Container, img: Option<&ImageConfig>) -> Result<Vec<String>, GenerateError> {
    let command = c.command.clone().unwrap_or_default();
    let args = c.args.clone().unwrap_or_default();
    if !command.is_empty() {
        return Ok(command.into_iter().chain(args).collect());
    }
    let image = c.image.as_deref().unwrap_or("");
    let Some(img) = img else {
        return Err(GenerateError::Missing(format!(
            "container '{}' has no command in the manifest, so its arguments come from image '{image}': give its config (--image-config '{image}=<config.json>') or a command",
            c.name
        )));
    };
    let entry = img.entrypoint.clone().unwrap_or_default();
    let tail = if args.is_empty() {
        img.cmd.clone().unwrap_or_default()
    } else {
        args
    };
    let all: Vec<String> = entry.into_iter().chain(tail).collect();
    if all.is_empty() {
        return Err(GenerateError::Missing(format!(
            "container '{}' has no command, and image '{image}' names neither entrypoint nor cmd",
            c.name
        )));
    }
    Ok(all)
}

fn capabilities(c: &Container) -> Result<Vec<String>, GenerateError> {
    let sc = c.security_context.as_ref();
    if sc.and_then(|s| s.privileged).unwrap_or(false) {
        return Err(GenerateError::Refused(format!(
            "container '{}' is privileged: write its rule by hand (a privileged container gets every capability and the guest's devices)",
            c.name
        )));
    }
    let norm = |s: &str| {
        let s = s.to_ascii_uppercase();
        if s.starts_with("CAP_") {
            s
        } else {
            format!("CAP_{s}")
        }
    };
    let mut set: BTreeSet<String> = DEFAULT_CAPABILITIES.iter().map(|s| s.to_string()).collect();
    if let Some(caps) = sc.and_then(|s| s.capabilities.as_ref()) {
        for d in caps.drop.iter().flatten() {
            if d.eq_ignore_ascii_case("ALL") {
                set.clear();
            } else {
                set.remove(&norm(d));
            }
        }
        for a in caps.add.iter().flatten() {
            if a.eq_ignore_ascii_case("ALL") {
                return Err(GenerateError::Refused(format!(
                    "container '{}' adds ALL capabilities: name the ones it needs",
                    c.name
                )));
            }
            set.insert(norm(a));
        }
    }
    Ok(set.into_iter().collect())
}

struct Rule {
    name: String,
    root_hash: String,
    args: Vec<String>,
    env: Vec<String>,
    env_names: Vec<String>,
    cwd: Option<String>,
    mounts: Vec<String>,
    capabilities: Option<Vec<String>>,
    stdin: bool,
    terminal: bool,
    exec: Vec<Vec<String>>,
}

impl Rule {
    fn write(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "\n[[container]]");
        let _ = writeln!(out, "name = {}", toml::Value::String(self.name.clone()));
        let _ = writeln!(
            out,
            "root_hash = {}",
            toml_list(std::slice::from_ref(&self.root_hash))
        );
        let _ = writeln!(out, "args = {}", toml_list(&self.args));
        if !self.env.is_empty() {
            let _ = writeln!(out, "env = {}", toml_list(&self.env));
        }
        let _ = writeln!(out, "env_names = {}", toml_list(&self.env_names));
        if let Some(cwd) = &self.cwd {
            let _ = writeln!(out, "cwd = {}", toml::Value::String(cwd.clone()));
        }
        if !self.mounts.is_empty() {
            let _ = writeln!(out, "mounts = {}", toml_list(&self.mounts));
        }
        if let Some(c) = &self.capabilities {
            let _ = writeln!(out, "capabilities = {}", toml_list(c));
        }
        if self.stdin {
            let _ = writeln!(out, "stdin = true");
        }
        if self.terminal {
            let _ = writeln!(out, "terminal = true");
        }
        for e in &self.exec {
            let _ = writeln!(out, "\n[[container.exec]]");
            let _ = writeln!(out, "args = {}", toml_list(e));
            // The command is fixed; whether it is run with `kubectl exec
            // -it` or without does not change what runs.
            let _ = writeln!(out, "stdin = true\nterminal = true");
        }
    }
}

/// Writes the policy for `pod`.
pub fn generate(pod: &Pod, inputs: &Inputs) -> Result<Generated, GenerateError> {
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| GenerateError::Manifest("it has no spec".into()))?;
    let mut notes = Vec::new();
    if spec.host_network == Some(true) || spec.host_pid == Some(true) || spec.host_ipc == Some(true)
    {
        return Err(GenerateError::Refused(
            "the pod asks for a host namespace (hostNetwork, hostPID or hostIPC), which veil pods refuse".into(),
        ));
    }
    if spec.init_containers.as_ref().is_some_and(|v| !v.is_empty())
        || spec
            .ephemeral_containers
            .as_ref()
            .is_some_and(|v| !v.is_empty())
    {
        notes.push(
            "init containers get rules like the others; ephemeral containers (kubectl debug) are not allowed by this policy".into(),
        );
    }
    for name in inputs.exec.keys() {
        if !spec.containers.iter().any(|c| &c.name == name) {
            return Err(GenerateError::Missing(format!(
                "--exec names container '{name}', which the pod does not have"
            )));
        }
    }
    let service_links = spec.enable_service_links != Some(false);
    if service_links {
        notes.push(
            "enableServiceLinks is not false: only KUBERNETES_* service variables are allowed; set enableServiceLinks: false, or other services' variables will be refused".into(),
        );
    }
    let token = spec.automount_service_account_token != Some(false);

    let mut rules = vec![Rule {
        name: PAUSE_RULE.into(),
        root_hash: root_hash(inputs, &inputs.pause_image, "the pod's sandbox")?,
        args: vec!["/pause".into()],
        env: vec![],
        env_names: vec!["PATH".into()],
        cwd: None,
        mounts: vec![],
        capabilities: None,
        stdin: false,
        terminal: false,
        exec: vec![],
    }];
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    for c in containers {
        let image = c.image.clone().ok_or_else(|| {
            GenerateError::Manifest(format!("container '{}' names no image", c.name))
        })?;
        let who = format!("container '{}'", c.name);
        let img = inputs.image_configs.get(&image);
        let args = container_args(c, img)?;
        let mut env = BTreeSet::new();
        let mut env_names: BTreeSet<String> = ["PATH", "HOSTNAME"].map(String::from).into();
        if c.tty == Some(true) {
            env_names.insert("TERM".into());
        }
        if service_links {
            env_names.insert("KUBERNETES_*".into());
        }
        for e in img.and_then(|i| i.env.as_ref()).into_iter().flatten() {
            if e.contains('=') {
                env.insert(e.clone());
            }
        }
        for e in c.env.iter().flatten() {
            match (&e.value, &e.value_from) {
                (_, Some(_)) => {
                    notes.push(format!(
                        "{who}: variable {} comes from a reference, so any value is allowed",
                        e.name
                    ));
                    env_names.insert(e.name.clone());
                }
                (v, None) => {
                    env.insert(format!("{}={}", e.name, v.clone().unwrap_or_default()));
                }
            }
        }
        if c.env_from.as_ref().is_some_and(|v| !v.is_empty()) {
            return Err(GenerateError::Refused(format!(
                "{who} uses envFrom, whose variable names are only known at run time: list them under env"
            )));
        }
        let mut mounts: BTreeSet<String> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.clone())
            .collect();
        mounts.insert(
            c.termination_message_path
                .clone()
                .unwrap_or_else(|| "/dev/termination-log".into()),
        );
        mounts.insert("/etc/hosts".into());
        if token {
            mounts.insert("/var/run/secrets/kubernetes.io/serviceaccount".into());
        }
        let caps = capabilities(c)?;
        let default: BTreeSet<String> =
            DEFAULT_CAPABILITIES.iter().map(|s| s.to_string()).collect();
        let caps_set: BTreeSet<String> = caps.iter().cloned().collect();
        rules.push(Rule {
            name: c.name.clone(),
            root_hash: root_hash(inputs, &image, &who)?,
            args,
            env: env.into_iter().collect(),
            env_names: env_names.into_iter().collect(),
            cwd: c
                .working_dir
                .clone()
                .or_else(|| img.and_then(|i| i.working_dir.clone()))
                .filter(|w| !w.is_empty()),
            mounts: mounts.into_iter().collect(),
            capabilities: (caps_set != default).then_some(caps),
            stdin: c.stdin == Some(true),
            terminal: c.tty == Some(true),
            exec: inputs.exec.get(&c.name).cloned().unwrap_or_default(),
        });
    }
    let mut document = String::from("version = 1\n");
    for r in &rules {
        r.write(&mut document);
    }
    Policy::parse(document.as_bytes())?;
    Ok(Generated { document, notes })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::eval::ExecView;

    const IMAGE: &str = "docker.io/library/busybox:1.36";

    fn inputs() -> Inputs {
        let mut i = Inputs {
            pause_image: DEFAULT_PAUSE_IMAGE.into(),
            ..Inputs::default()
        };
        i.root_hashes.insert(IMAGE.into(), "ab".repeat(32));
        i.root_hashes
            .insert(DEFAULT_PAUSE_IMAGE.into(), "cd".repeat(32));
        i
    }

    fn pod(container: &str) -> Pod {
        parse_pod(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  enableServiceLinks: false\n  containers:\n  - name: app\n    image: {IMAGE}\n{container}"
        ))
        .unwrap()
    }

    fn rules(g: &Generated) -> Vec<crate::ContainerRule> {
        match Policy::parse(g.document.as_bytes()).unwrap().containers {
            crate::Containers::Rules(r) => r,
            crate::Containers::Any { .. } => panic!("rules expected"),
        }
    }

    #[test]
    fn command_env_mounts_and_exec_become_one_rule_beside_the_pause_rule() {
        let p = pod("    command: [httpd, -f]\n    args: [-p, '80']\n    env:\n    - {name: MODE, value: prod}\n    - name: TOKEN\n      valueFrom: {secretKeyRef: {name: s, key: k}}\n    volumeMounts:\n    - {name: d, mountPath: /data}\n");
        let mut i = inputs();
        i.exec.insert(
            "app".into(),
            vec![vec!["cat".into(), "/proc/loadavg".into()]],
        );
        let g = generate(&p, &i).unwrap();
        let r = rules(&g);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].name, PAUSE_RULE);
        assert_eq!(r[0].args, ["/pause"]);
        let app = &r[1];
        assert_eq!(app.args, ["httpd", "-f", "-p", "80"]);
        assert!(app.root_hashes.contains(&"ab".repeat(32)));
        assert!(app.env.contains("MODE=prod"));
        assert!(!app.env.iter().any(|e| e.starts_with("TOKEN")));
        assert!(app.mounts.contains("/data"));
        assert!(app.mounts.contains("/dev/termination-log"));
        assert!(g.notes.iter().any(|n| n.contains("TOKEN")));
        let policy = Policy::parse(g.document.as_bytes()).unwrap();
        let exec = |args: &[&str]| ExecView {
            args: args.iter().map(|s| s.to_string()).collect(),
            ..ExecView::default()
        };
        assert!(policy
            .check_exec(Some(1), &exec(&["cat", "/proc/loadavg"]))
            .is_ok());
        let denied = policy
            .check_exec(Some(1), &exec(&["cat", "/data/secret"]))
            .unwrap_err();
        assert_eq!(denied.rule.as_deref(), Some("app"));
    }

    #[test]
    fn arguments_come_from_the_image_config_as_containerd_builds_them() {
        let mut i = inputs();
        i.image_configs.insert(
            IMAGE.into(),
            ImageConfig::from_json(
                br#"{"config":{"Entrypoint":["/bin/app"],"Cmd":["--serve"],"Env":["PATH=/bin"],"WorkingDir":"/srv"}}"#,
            )
            .unwrap(),
        );
        let r = rules(&generate(&pod(""), &i).unwrap());
        assert_eq!(r[1].args, ["/bin/app", "--serve"]);
        assert_eq!(r[1].cwd.as_deref(), Some("/srv"));
        assert!(r[1].env.contains("PATH=/bin"));
        // args replace the image's cmd, keep its entrypoint.
        let r = rules(&generate(&pod("    args: [--debug]\n"), &i).unwrap());
        assert_eq!(r[1].args, ["/bin/app", "--debug"]);
        // command replaces both.
        let r = rules(&generate(&pod("    command: [sh]\n"), &i).unwrap());
        assert_eq!(r[1].args, ["sh"]);
    }

    #[test]
    fn what_the_inputs_do_not_say_is_an_error_naming_it() {
        let e = generate(&pod(""), &inputs()).unwrap_err().to_string();
        assert!(
            e.contains("no command") && e.contains("--image-config"),
            "{e}"
        );
        let mut i = inputs();
        i.root_hashes.remove(IMAGE);
        let e = generate(&pod("    command: [sh]\n"), &i)
            .unwrap_err()
            .to_string();
        assert!(e.contains(IMAGE) && e.contains("--root-hash"), "{e}");
        let mut i = inputs();
        i.exec.insert("nope".into(), vec![vec!["ls".into()]]);
        let e = generate(&pod("    command: [sh]\n"), &i)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'nope'"), "{e}");
        let e = generate(
            &pod("    command: [sh]\n    securityContext: {privileged: true}\n"),
            &inputs(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("privileged"), "{e}");
        let e = parse_pod("kind: Pod\nspec: 3\n").unwrap_err().to_string();
        assert!(e.contains("not a Kubernetes Pod"), "{e}");
    }

    #[test]
    fn capabilities_follow_add_and_drop() {
        let r = rules(
            &generate(
                &pod("    command: [sh]\n    securityContext:\n      capabilities: {drop: [ALL], add: [NET_BIND_SERVICE]}\n"),
                &inputs(),
            )
            .unwrap(),
        );
        assert_eq!(
            r[1].capabilities.iter().collect::<Vec<_>>(),
            ["CAP_NET_BIND_SERVICE"]
        );
    }
}
