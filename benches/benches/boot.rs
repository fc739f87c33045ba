//! Boot latency: QEMU spawn → first successful agent health answer over hybrid
//! vsock, next to the floor measured in the same run: the same kernel and VM
//! shape booting a trivial `/init` that prints one line and powers off.
//!
//! Run: `cargo bench -p veil-benches --bench boot` (VEIL_BENCH_RUNS=N, default 10).

use std::time::Duration;

use anyhow::Result;
use veil_benches::{floor_once, report, runs, summarize};
use veil_protocol::{agent::CheckRequest, agent_ttrpc::HealthClient};
use veil_shim::vmm::Accel;
use veil_test_support::{Artefacts, TestVm, VmOptions};

/// One agent boot: spawn → the agent's readiness call, and spawn → its first
/// health answer; also the accelerator used.
struct AgentBoot {
    ready: Duration,
    health: Duration,
    accel: Accel,
}

async fn agent_once(a: &Artefacts) -> Result<AgentBoot> {
    let vm = TestVm::boot(a, &VmOptions::agent(a))?;
    vm.wait_ready(Duration::from_secs(60)).await?;
    let ready = vm.started.elapsed();
    let client = vm.agent_client(Duration::from_secs(60)).await?;
    HealthClient::new(client)
        .check(
            ttrpc::context::with_timeout(10_000_000_000),
            &CheckRequest::new(),
        )
        .await?;
    Ok(AgentBoot {
        ready,
        health: vm.started.elapsed(),
        accel: vm.accel,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let a = Artefacts::locate()?;
    let n = runs(10);
    let (mut floor, mut ready, mut agent) = (Vec::new(), Vec::new(), Vec::new());
    let mut accel = None;
    // Interleave the two so that drifting machine load affects both alike.
    for i in 0..n {
        floor.push(floor_once(&a)?);
        let b = agent_once(&a).await?;
        ready.push(b.ready);
        agent.push(b.health);
        accel = Some(b.accel);
        eprintln!(
            "run {}/{n}: floor {:?}, agent ready {:?}, health {:?}",
            i + 1,
            floor[i],
            b.ready,
            b.health
        );
    }
    let (f, r, g) = (summarize(&floor), summarize(&ready), summarize(&agent));
    println!("boot latency (QEMU spawn →), {n} runs each, accel {accel:?}");
    report("floor: trivial /init prints", &f);
    report("veil-agent: readiness call", &r);
    report("veil-agent: first health answer", &g);
    let over = g.median.as_secs_f64() / f.median.as_secs_f64() - 1.0;
    println!("agent over floor (medians): {:+.1}%", over * 100.0);
    Ok(())
}
