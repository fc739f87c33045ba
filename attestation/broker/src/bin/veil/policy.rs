//! `veil policy`: write a pod's request policy from its manifest, print the
//! init-data digest a TEE binds for it, and explain why a request would be
//! denied — with the same parser and evaluator the agent enforces.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Subcommand, ValueEnum};
use sha2::Digest;
use veil_policy::{
    eval::{ContainerView, ExecView},
    generate::{self, ImageConfig, Inputs},
    Policy,
};

/// The annotation that carries the policy to the shim.
pub const ANNOTATION: &str = "io.veil.policy";

/// The TEE whose host-data field binds the policy.
#[derive(Clone, Copy, ValueEnum)]
pub enum DigestTee {
    /// veil's simulated TEE: SHA-256 in HOST_DATA.
    Sim,
    /// AMD SEV-SNP: SHA-256 in HOST_DATA.
    Snp,
    /// Intel TDX: SHA-384 in MRCONFIGID.
    Tdx,
}

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Write a policy from a Kubernetes pod manifest (YAML or JSON).
    Generate {
        /// The pod manifest.
        manifest: PathBuf,
        /// An image's dm-verity root hash, IMAGE=HEX (one per image, the
        /// pause image included).
        #[arg(long = "root-hash", value_name = "IMAGE=HEX")]
        root_hashes: Vec<String>,
        /// An image's OCI config JSON, IMAGE=FILE, for containers whose
        /// manifest gives no command.
        #[arg(long = "image-config", value_name = "IMAGE=FILE")]
        image_configs: Vec<String>,
        /// A command the host may exec in a container, CONTAINER=COMMAND
        /// (split on spaces; repeat for more).
        #[arg(long = "exec", value_name = "CONTAINER=COMMAND")]
        exec: Vec<String>,
        /// The pod's pause image.
        #[arg(long, default_value = generate::DEFAULT_PAUSE_IMAGE)]
        pause_image: String,
        /// Print the manifest with the policy annotation added instead of
        /// the policy alone.
        #[arg(long)]
        annotate: bool,
        /// TEE for the digest printed to stderr.
        #[arg(long, value_enum, default_value_t = DigestTee::Sim)]
        tee: DigestTee,
    },
    /// Print the init-data digest a TEE binds for a policy document.
    Digest {
        /// The policy (TOML).
        policy: PathBuf,
        /// Which TEE's host-data field.
        #[arg(long, value_enum, default_value_t = DigestTee::Sim)]
        tee: DigestTee,
    },
    /// Explain whether a request would be allowed: a container to create
    /// (`--spec`) or an exec (`--container` and the command).
    Check {
        /// The policy (TOML).
        policy: PathBuf,
        /// An OCI runtime spec (config.json) of a container to create.
        #[arg(long, conflicts_with = "container")]
        spec: Option<PathBuf>,
        /// The dm-verity root hash of that container's rootfs image.
        #[arg(long, requires = "spec")]
        root_hash: Option<String>,
        /// The rule (container name) an exec runs under.
        #[arg(long, requires = "command")]
        container: Option<String>,
        /// Whether the host attaches stdin.
        #[arg(long)]
        stdin: bool,
        /// Whether the exec has a terminal.
        #[arg(long)]
        tty: bool,
        /// The exec's command and arguments.
        #[arg(last = true)]
        command: Vec<String>,
    },
}

fn read(p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))
}

fn pairs(flag: &str, v: &[String]) -> Result<Vec<(String, String)>, String> {
    v.iter()
        .map(|s| {
            s.rsplit_once('=')
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("{flag} '{s}' is not KEY=VALUE"))
        })
        .collect()
}

/// The digest `tee` binds for `doc` (hex).
pub fn digest(tee: DigestTee, doc: &[u8]) -> String {
    match tee {
        DigestTee::Tdx => hex::encode(sha2::Sha384::digest(doc)),
        DigestTee::Sim | DigestTee::Snp => hex::encode(sha2::Sha256::digest(doc)),
    }
}

fn parse_policy(p: &Path) -> Result<(Vec<u8>, Policy), String> {
    let doc = read(p)?;
    let policy = Policy::parse(&doc).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok((doc, policy))
}

/// Runs a `veil policy` command; `Ok(false)`: a check found a denial.
pub fn run(cmd: PolicyCmd) -> Result<bool, String> {
    match cmd {
        PolicyCmd::Generate {
            manifest,
            root_hashes,
            image_configs,
            exec,
            pause_image,
            annotate,
            tee,
        } => {
            let text = String::from_utf8(read(&manifest)?)
                .map_err(|_| format!("{}: not UTF-8", manifest.display()))?;
            let mut pod = generate::parse_pod(&text).map_err(|e| e.to_string())?;
            let mut inputs = Inputs {
                pause_image,
                ..Inputs::default()
            };
            for (image, hash) in pairs("--root-hash", &root_hashes)? {
                inputs.root_hashes.insert(image, hash);
            }
            for (image, file) in pairs("--image-config", &image_configs)? {
                let cfg = ImageConfig::from_json(&read(Path::new(&file))?)
                    .map_err(|e| format!("{file}: not an OCI image config: {e}"))?;
                inputs.image_configs.insert(image, cfg);
            }
            let mut execs: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
            for s in &exec {
                let (c, cmd) = s
                    .split_once('=')
                    .filter(|(c, cmd)| !c.is_empty() && !cmd.trim().is_empty())
                    .ok_or_else(|| format!("--exec '{s}' is not CONTAINER=COMMAND"))?;
                let argv = cmd.split_whitespace().map(String::from).collect();
                execs.entry(c.to_string()).or_default().push(argv);
            }
            inputs.exec = execs;
            let g = generate::generate(&pod, &inputs).map_err(|e| e.to_string())?;
            for n in &g.notes {
                eprintln!("note: {n}");
            }
            eprintln!(
                "init-data digest ({}): {}",
                match tee {
                    DigestTee::Sim => "simulated HOST_DATA, SHA-256",
                    DigestTee::Snp => "SEV-SNP HOST_DATA, SHA-256",
                    DigestTee::Tdx => "TDX MRCONFIGID, SHA-384",
                },
                digest(tee, g.document.as_bytes())
            );
            if annotate {
                pod.metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(ANNOTATION.into(), g.document);
                let out = serde_yaml_ng::to_string(&pod).map_err(|e| e.to_string())?;
                print!("{out}");
            } else {
                eprintln!("add it to the pod as the annotation {ANNOTATION} (or use --annotate)");
                print!("{}", g.document);
            }
            Ok(true)
        }
        PolicyCmd::Digest { policy, tee } => {
            let (doc, _) = parse_policy(&policy)?;
            println!("{}", digest(tee, &doc));
            Ok(true)
        }
        PolicyCmd::Check {
            policy,
            spec,
            root_hash,
            container,
            stdin,
            tty,
            command,
        } => {
            let (_, p) = parse_policy(&policy)?;
            let verdict = if let Some(spec) = spec {
                let s: oci_spec::runtime::Spec = serde_json::from_slice(&read(&spec)?)
                    .map_err(|e| format!("{}: not an OCI runtime spec: {e}", spec.display()))?;
                let view = ContainerView::of(&s, stdin, root_hash.map(|h| h.to_lowercase()));
                p.check_container(&view).map(|rule| match rule {
                    Some(i) => format!("allowed by rule '{}'", rule_name(&p, i)),
                    None => format!("allowed by the {}", p.source),
                })
            } else if let Some(name) = container {
                let rule = rule_index(&p, &name)?;
                let view = ExecView {
                    args: command,
                    stdin,
                    terminal: tty,
                    ..ExecView::default()
                };
                p.check_exec(rule, &view)
                    .map(|()| format!("exec allowed in container '{name}'"))
            } else {
                return Err("give --spec CONFIG.JSON, or --container NAME -- COMMAND...".into());
            };
            match verdict {
                Ok(why) => {
                    println!("{why}");
                    Ok(true)
                }
                Err(denied) => {
                    println!("denied: {denied}");
                    Ok(false)
                }
            }
        }
    }
}

fn rule_name(p: &Policy, i: usize) -> String {
    match &p.containers {
        veil_policy::Containers::Rules(r) => r.get(i).map(|r| r.name.clone()).unwrap_or_default(),
        veil_policy::Containers::Any { .. } => String::new(),
    }
}

fn rule_index(p: &Policy, name: &str) -> Result<Option<usize>, String> {
    match &p.containers {
        veil_policy::Containers::Rules(r) => r
            .iter()
            .position(|r| r.name == name)
            .map(Some)
            .ok_or_else(|| format!("the policy has no container rule '{name}'")),
        veil_policy::Containers::Any { .. } => Ok(None),
    }
}
