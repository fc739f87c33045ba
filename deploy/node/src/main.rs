//! `veil-node`: check a node, install veil on it, take it off again.
//!
//! Exit codes: 0 success; 1 failure (one line on stderr); 2 bad command
//! line; 10-15 `check` (and `install` when no handler can run): the first
//! class of need that fails (see `veil_node::check::Need::exit_code` and
//! docs/install.md).

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use veil_node::{
    check,
    host::Host,
    install::{self, InstallError, Options},
    kube::InCluster,
};

const ALL: &[&str] = &["veil", "veil-sim", "veil-snp", "veil-tdx"];

#[derive(Parser)]
#[command(
    name = "veil-node",
    version,
    about = "Install veil on a Kubernetes node"
)]
struct Cli {
    /// Where this process sees the host's `/` (`/host` in the DaemonSet).
    #[arg(long, default_value = "/", global = true)]
    root: PathBuf,
    /// What the host calls that directory, for paths written into configs
    /// (default: `/`; tests installing into a temp dir give the same dir).
    #[arg(long, global = true)]
    root_in_host: Option<PathBuf>,
    /// Run host commands (containerd, systemctl) in PID 1's mount namespace
    /// (needs the host's PID namespace).
    #[arg(long, global = true)]
    host_mount_ns: bool,
    /// Restart containerd with this shell command when the host has no
    /// systemd.
    #[arg(long, global = true)]
    restart_cmd: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Report what the node has and which handlers can run.
    Check {
        /// Handlers to judge (default: all four).
        #[arg(long = "handler")]
        handlers: Vec<String>,
    },
    /// Install or upgrade veil on the node.
    Install(InstallArgs),
    /// Remove what install added.
    Uninstall,
    /// Install, serve the node's metrics, wait for SIGTERM or SIGINT,
    /// uninstall (the DaemonSet).
    Run {
        #[command(flatten)]
        install: InstallArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Serve the node's metrics (Prometheus / OpenMetrics) only.
    Metrics(MetricsArgs),
}

#[derive(clap::Args)]
struct MetricsArgs {
    /// Address to serve /metrics on; `off` in `run` serves none.
    #[arg(long, default_value = "0.0.0.0:9464")]
    metrics_listen: String,
    /// The shims' state directory on the host (`state_dir` of the veil
    /// config), under --root.
    #[arg(long, default_value = "/run/veil")]
    state_dir: PathBuf,
}

fn start_metrics(host: &Host, a: &MetricsArgs) -> Result<(), ExitCode> {
    if a.metrics_listen == "off" {
        return Ok(());
    }
    let listener = std::net::TcpListener::bind(&a.metrics_listen).map_err(|e| {
        eprintln!(
            "veil-node: cannot serve metrics on {}: {e}",
            a.metrics_listen
        );
        ExitCode::from(1)
    })?;
    let dir = host.at(&a.state_dir.to_string_lossy());
    println!(
        "serving metrics on {}",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    std::thread::spawn(move || {
        if let Err(e) = veil_node::metrics::serve(listener, &dir) {
            eprintln!("veil-node: metrics stopped: {e}");
        }
    });
    Ok(())
}

#[derive(clap::Args)]
struct InstallArgs {
    /// The artefacts to install (`bin/`, `share/`).
    #[arg(long, default_value = "/veil")]
    from: PathBuf,
    /// Handlers to enable where the node can run them (default: all four).
    #[arg(long = "handler")]
    handlers: Vec<String>,
}

fn handlers_or_all(h: &[String]) -> Vec<String> {
    if h.is_empty() {
        ALL.iter().map(|s| s.to_string()).collect()
    } else {
        h.to_vec()
    }
}

fn fail(e: &(dyn std::error::Error + 'static)) -> ExitCode {
    eprintln!("veil-node: {}", veil_shim::error_chain(e));
    let code = match e.downcast_ref::<InstallError>() {
        Some(InstallError::NothingRuns { code }) => *code,
        _ => 1,
    };
    ExitCode::from(code)
}

fn do_install(host: &Host, cli: &Cli, a: &InstallArgs) -> Result<(), ExitCode> {
    let report = check::run(host);
    let opts = Options {
        from: a.from.clone(),
        handlers: handlers_or_all(&a.handlers),
        restart_cmd: cli.restart_cmd.clone(),
    };
    let out = install::install(host, &report, &opts).map_err(|e| {
        eprint!("{}", report.table(ALL));
        fail(&e)
    })?;
    for c in &out.changed {
        println!("wrote {c}");
    }
    if out.restarted {
        println!("restarted containerd");
    }
    match &out.artefacts {
        (Some(now), Some(was)) if now != was => println!("upgraded artefacts {was} -> {now}"),
        (Some(now), _) => println!("artefacts {now}"),
        (None, _) => {}
    }
    println!("enabled handlers: {}", out.handlers.join(" "));
    label(&out.handlers)
}

fn label(enabled: &[String]) -> Result<(), ExitCode> {
    match InCluster::from_env() {
        Ok(Some(k)) => {
            k.label(enabled, ALL).map_err(|e| fail(&e))?;
            println!("labelled node {}", k.node);
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(fail(&e)),
    }
}

fn do_uninstall(host: &Host, cli: &Cli) -> Result<(), ExitCode> {
    label(&[])?;
    let out = install::uninstall(host, cli.restart_cmd.as_deref()).map_err(|e| fail(&e))?;
    for c in &out.changed {
        println!("restored or removed {c}");
    }
    if out.restarted {
        println!("restarted containerd");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let host = Host {
        root: cli.root.clone(),
        view: cli.root_in_host.clone().unwrap_or_else(|| "/".into()),
        host_mount_ns: cli.host_mount_ns,
    };
    let result = match &cli.cmd {
        Cmd::Check { handlers } => {
            let report = check::run(&host);
            let h = handlers_or_all(handlers);
            let h: Vec<&str> = h.iter().map(String::as_str).collect();
            print!("{}", report.table(&h));
            return ExitCode::from(report.exit_code(&h));
        }
        Cmd::Install(a) => do_install(&host, &cli, a),
        Cmd::Uninstall => do_uninstall(&host, &cli),
        Cmd::Metrics(m) => {
            if let Err(code) = start_metrics(&host, m) {
                return code;
            }
            let mut set = SigSet::empty();
            set.add(Signal::SIGTERM);
            set.add(Signal::SIGINT);
            if let Err(e) = set.thread_block() {
                return fail(&e);
            }
            return match set.wait() {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            };
        }
        Cmd::Run {
            install: a,
            metrics,
        } => {
            // Blocked before installing, so a SIGTERM during install is
            // taken after it, not lost.
            let mut set = SigSet::empty();
            set.add(Signal::SIGTERM);
            set.add(Signal::SIGINT);
            if let Err(e) = set.thread_block() {
                return fail(&e);
            }
            match do_install(&host, &cli, a) {
                Err(code) => Err(code),
                Ok(()) => {
                    if let Err(code) = start_metrics(&host, metrics) {
                        let _ = do_uninstall(&host, &cli);
                        return code;
                    }
                    println!("installed; waiting for SIGTERM to uninstall");
                    match set.wait() {
                        Ok(sig) => println!("{sig}: uninstalling"),
                        Err(e) => return fail(&e),
                    }
                    do_uninstall(&host, &cli)
                }
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}
