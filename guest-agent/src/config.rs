//! Agent configuration: from the command line (host mode, tests) and, as PID 1,
//! from `veil.*` kernel parameters.
//!
//! Kernel parameters come from the host and are not trusted for anything that
//! policy protects; they only select log verbosity and similar conveniences.

use std::path::PathBuf;

/// Where the agent API is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// AF_VSOCK on this port, any CID (the normal case inside a VM).
    Vsock(u32),
    /// A unix socket at this path (host mode).
    Unix(PathBuf),
}

/// The agent's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Whether to do PID 1 set-up (mounts). True when running as PID 1.
    pub init: bool,
    /// Where to serve the API.
    pub listen: Listen,
    /// `tracing` filter, e.g. `info` or `veil_agent=debug`.
    pub log_filter: String,
    /// Where container state lives (default `/run/veil`).
    pub state_dir: PathBuf,
    /// Parent cgroup of the containers (default `<cgroup2 mount>/veil`).
    pub cgroup_parent: Option<PathBuf>,
    /// The kernel command line (PID 1), where the measured attestation
    /// configuration is (see [`crate::attest`]); empty in host mode.
    pub kernel_cmdline: String,
}

impl Config {
    /// Host mode: serving on a unix socket on a host, not as a VM's agent.
    /// Allows image files, directories and host paths in requests.
    pub fn host_mode(&self) -> bool {
        matches!(self.listen, Listen::Unix(_))
    }
}

/// A bad command line or kernel parameter.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An argument the agent does not know.
    #[error(
        "unknown argument '{0}' (expected --listen unix:PATH|vsock:PORT, --log FILTER, --init, --state-dir DIR, --cgroup-parent DIR)"
    )]
    UnknownArgument(String),
    /// An option without its value.
    #[error("option '{0}' needs a value")]
    MissingValue(String),
    /// A path option that is not absolute.
    #[error("option '{0}' needs an absolute path")]
    NotAbsolute(String),
    /// A malformed `--listen` value.
    #[error("bad listen address '{0}' (expected unix:PATH or vsock:PORT)")]
    BadListen(String),
}

impl Config {
    /// Builds the configuration from command-line arguments (without `argv[0]`).
    /// As PID 1 the defaults are: init set-up on, vsock port 1024, and kernel
    /// parameters `veil.log=FILTER` read from `/proc/cmdline` after mounting.
    pub fn from_args<I: IntoIterator<Item = String>>(args: I) -> Result<Self, ConfigError> {
        let pid1 = crate::init::is_pid1();
        let mut cfg = Config {
            init: pid1,
            listen: Listen::Vsock(veil_protocol::AGENT_VSOCK_PORT),
            log_filter: "info".to_string(),
            state_dir: PathBuf::from("/run/veil"),
            cgroup_parent: None,
            kernel_cmdline: String::new(),
        };
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--listen" => {
                    let v = it
                        .next()
                        .ok_or_else(|| ConfigError::MissingValue(a.clone()))?;
                    cfg.listen = parse_listen(&v)?;
                }
                "--log" => {
                    cfg.log_filter = it
                        .next()
                        .ok_or_else(|| ConfigError::MissingValue(a.clone()))?;
                }
                "--init" => cfg.init = true,
                "--state-dir" | "--cgroup-parent" => {
                    let v = it
                        .next()
                        .ok_or_else(|| ConfigError::MissingValue(a.clone()))?;
                    if !v.starts_with('/') {
                        return Err(ConfigError::NotAbsolute(a.clone()));
                    }
                    if a == "--state-dir" {
                        cfg.state_dir = PathBuf::from(v);
                    } else {
                        cfg.cgroup_parent = Some(PathBuf::from(v));
                    }
                }
                _ => return Err(ConfigError::UnknownArgument(a)),
            }
        }
        Ok(cfg)
    }

    /// Applies `veil.*` kernel parameters from a `/proc/cmdline` text.
    pub fn apply_kernel_cmdline(&mut self, cmdline: &str) {
        self.kernel_cmdline = cmdline.trim().to_string();
        for word in cmdline.split_whitespace() {
            if let Some(v) = word.strip_prefix("veil.log=") {
                self.log_filter = v.to_string();
            }
        }
    }
}

fn parse_listen(v: &str) -> Result<Listen, ConfigError> {
    if let Some(p) = v.strip_prefix("unix:") {
        if p.is_empty() {
            return Err(ConfigError::BadListen(v.to_string()));
        }
        return Ok(Listen::Unix(PathBuf::from(p)));
    }
    if let Some(p) = v.strip_prefix("vsock:") {
        return p
            .parse()
            .map(Listen::Vsock)
            .map_err(|_| ConfigError::BadListen(v.to_string()));
    }
    Err(ConfigError::BadListen(v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_listen_addresses() {
        let c = Config::from_args(args(&["--listen", "unix:/tmp/a.sock"])).unwrap();
        assert_eq!(c.listen, Listen::Unix("/tmp/a.sock".into()));
        let c = Config::from_args(args(&["--listen", "vsock:2000"])).unwrap();
        assert_eq!(c.listen, Listen::Vsock(2000));
    }

    #[test]
    fn rejects_bad_arguments_by_name() {
        let e = Config::from_args(args(&["--listen", "tcp:1"])).unwrap_err();
        assert!(matches!(e, ConfigError::BadListen(ref s) if s == "tcp:1"));
        let e = Config::from_args(args(&["--frobnicate"])).unwrap_err();
        assert!(matches!(e, ConfigError::UnknownArgument(ref s) if s == "--frobnicate"));
        let e = Config::from_args(args(&["--log"])).unwrap_err();
        assert!(matches!(e, ConfigError::MissingValue(_)));
    }

    #[test]
    fn kernel_cmdline_sets_log_filter() {
        let mut c = Config::from_args(Vec::new()).unwrap();
        c.apply_kernel_cmdline("console=ttyS0 quiet veil.log=debug panic=-1");
        assert_eq!(c.log_filter, "debug");
    }
}
