//! The pod sandbox: what the pod's containers share — hostname, the DNS and
//! hosts files (served to containers as `sandbox:NAME` bind sources) and,
//! optionally, one PID namespace held by a tiny holder process.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use veil_protocol::agent::CreateSandboxRequest;

use crate::{
    process::Process,
    validate::{self, ValidationError},
};

/// Largest resolv.conf or hosts file accepted.
pub const MAX_FILE: usize = 64 * 1024;

/// Files a container may bind from the sandbox.
pub const FILES: &[&str] = &["hostname", "hosts", "resolv.conf"];

/// The sandbox's state.
pub struct Sandbox {
    /// Its id.
    pub id: String,
    /// The pod hostname ("" = none).
    pub hostname: String,
    /// Directory of the shared files.
    pub dir: PathBuf,
    /// Holder of the shared PID namespace, if any.
    pub pid_holder: Option<Arc<Process>>,
}

/// Checks a CreateSandbox request.
pub fn validate(req: &CreateSandboxRequest) -> Result<(), ValidationError> {
    validate::id("sandbox_id", &req.sandbox_id)?;
    validate::max_len("hostname", req.hostname.len(), 64)?;
    let host_ok = req
        .hostname
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !host_ok {
        return Err(ValidationError::HostName {
            field: "hostname",
            value: req.hostname.chars().take(64).collect(),
        });
    }
    validate::max_len("resolv_conf", req.resolv_conf.len(), MAX_FILE)?;
    validate::max_len("hosts", req.hosts.len(), MAX_FILE)?;
    Ok(())
}

/// Writes the shared files into `dir`.
pub fn write_files(dir: &Path, req: &CreateSandboxRequest) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let hostname = if req.hostname.is_empty() {
        String::new()
    } else {
        format!("{}\n", req.hostname)
    };
    fs::write(dir.join("hostname"), hostname)?;
    fs::write(dir.join("hosts"), &req.hosts)?;
    fs::write(dir.join("resolv.conf"), &req.resolv_conf)?;
    Ok(())
}

/// Replaces the content of the pod's resolv.conf in place (the same
/// inode, so the binds of running containers see it too).
pub fn rewrite_resolv_conf(dir: &Path, content: &[u8]) -> std::io::Result<()> {
    let path = dir.join("resolv.conf");
    if fs::read(&path).is_ok_and(|old| old == content) {
        return Ok(());
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    std::io::Write::write_all(&mut f, content)
}

impl Sandbox {
    /// The path of shared file `name`, if it is one.
    pub fn file(&self, name: &str) -> Option<PathBuf> {
        FILES.contains(&name).then(|| self.dir.join(name))
    }

    /// The shared PID namespace's path, if the pod has one.
    pub fn pid_namespace(&self) -> Option<PathBuf> {
        let pid = self.pid_holder.as_ref()?.state().pid()?;
        Some(crate::engine::ns_path(
            pid,
            crate::engine::wire::Namespace::Pid,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_sizes_and_hostname() {
        let mut r = CreateSandboxRequest::new();
        r.sandbox_id = "pod1".into();
        r.hostname = "web-0.example".into();
        validate(&r).unwrap();
        r.hostname = "bad host".into();
        assert!(validate(&r).is_err());
        r.hostname = "h".into();
        r.hosts = vec![b'x'; MAX_FILE + 1];
        assert!(validate(&r).is_err());
    }
}
