//! veil's first-run demo: boot a pod VM and talk to the agent inside it.
//!
//! Used by `ci/demo.sh` after set-up and the artefact build.

use std::time::Duration;

use anyhow::Result;
use veil_protocol::{
    agent::{CheckRequest, ShutdownRequest, VersionRequest},
    agent_ttrpc::{GuestClient, HealthClient},
};
use veil_tests::{Artefacts, TestVm, VmOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let a = Artefacts::locate()?;
    println!(
        "booting a pod VM: kernel {}, initrd {}",
        a.kernel.display(),
        a.initrd.display()
    );
    let mut vm = TestVm::boot(&a, &VmOptions::agent(&a))?;
    println!(
        "QEMU started (accelerator: {:?}); waiting for the agent on vsock port 1024",
        vm.accel
    );
    let client = vm.agent_client(Duration::from_secs(60)).await?;
    let ctx = || ttrpc::context::with_timeout(10_000_000_000);
    let health = HealthClient::new(client.clone());
    let status = health.check(ctx(), &CheckRequest::new()).await?;
    let version = health.version(ctx(), &VersionRequest::new()).await?;
    println!(
        "agent answered after {:.0} ms: status {:?}, veil-agent {} (API v{})",
        vm.started.elapsed().as_secs_f64() * 1000.0,
        status.status,
        version.agent_version,
        version.api_version
    );
    GuestClient::new(client)
        .shutdown(ctx(), &ShutdownRequest::new())
        .await?;
    let stopped = vm.wait_exit(Duration::from_secs(30));
    println!(
        "VM {}",
        if stopped {
            "powered off"
        } else {
            "did not power off; killing it"
        }
    );
    Ok(())
}
