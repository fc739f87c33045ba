//! Network namespaces the tests create (`ip netns add`, a unique name),
//! removed when dropped, and commands run inside them.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use anyhow::{bail, Context, Result};

/// A named network namespace under `/run/netns`, deleted on drop.
pub struct Netns(String);

impl Netns {
    /// Creates `veil-PREFIX-PID` with `lo` up.
    pub fn create(prefix: &str) -> Result<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("this test needs root (it creates a network namespace)");
        }
        let name = format!("veil-{prefix}-{}", std::process::id());
        // A namespace of that name left by a killed earlier run of this PID.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns(name);
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Its path (`/run/netns/NAME`).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }

    /// `ip -n NAME ARGS` (split on whitespace); its stdout, or an error.
    pub fn ip(&self, args: &str) -> Result<String> {
        let mut v = vec!["ip", "-n", &self.0];
        v.extend(args.split_whitespace());
        run(&v)
    }

    /// `tc -n NAME ARGS`; its stdout, or an error.
    pub fn tc(&self, args: &str) -> Result<String> {
        let mut v = vec!["tc", "-n", &self.0];
        v.extend(args.split_whitespace());
        run(&v)
    }

    /// Runs `args` inside the namespace (`ip netns exec`).
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .context("running ip netns exec (iproute2)")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Runs `args`; its stdout, or an error with its stderr.
pub fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("{} not found: run ci/setup.sh (iproute2)", args[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
