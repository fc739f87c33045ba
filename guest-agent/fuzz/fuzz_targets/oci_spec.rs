//! OCI runtime specs and processes from the host, through parsing, validation
//! and the whole plan (mounts, namespaces, devices, sysctls, seccomp compile).
#![no_main]
use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use veil_agent::engine::plan;

struct Ctx;

impl plan::Context for Ctx {
    fn bind_source(&self, s: &str) -> Result<PathBuf, Box<dyn std::error::Error + Send + Sync>> {
        match s.strip_prefix("sandbox:") {
            Some("hosts") => Ok(PathBuf::from("/run/veil/sandbox/hosts")),
            _ => Err("refused".into()),
        }
    }
    fn host_mode(&self) -> bool {
        false
    }
    fn sandbox_hostname(&self) -> Option<String> {
        Some("pod".into())
    }
    fn shared_pid_namespace(&self) -> Option<PathBuf> {
        None
    }
    fn pod_namespace(&self, kind: veil_agent::engine::wire::Namespace) -> Option<PathBuf> {
        Some(PathBuf::from(format!("/proc/1/ns/{}", kind.proc_name())))
    }
    fn guest_devices(&self) -> Vec<veil_agent::engine::wire::DevicePlan> {
        Vec::new()
    }
    fn share_bind_source(&self, _: &Path) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = plan::parse_spec(data) {
        let _ = plan::plan_init(
            &spec,
            Path::new("/run/veil/containers/c/rootfs"),
            None,
            &Ctx,
        );
        if let Some(p) = spec.process().clone() {
            let _ = plan::plan_exec(&spec, 1, p, None);
        }
    }
    let _ = plan::parse_process(data);
    let _ = serde_json::from_slice::<oci_spec::runtime::LinuxResources>(data);
});
