//! Attestation round trip of a simulated-TEE pod: the agent in the VM runs
//! the whole RCAR exchange with the real `veil-kbs` on 127.0.0.1 — `/auth`,
//! evidence from the shim's simulated firmware over vsock, `/attest`, the
//! resource, JWE decryption — through the shim's relay, TLS end to end.
//!
//! Baselines in the same run: the same exchange from the host process (the
//! same client library and broker, evidence signed in process: no VM, no
//! vsock, no TCG), and a trivial agent RPC (`Health.Check`) to the same
//! guest.
//!
//! Run: `cargo bench -p veil-benches --bench attest` (VEIL_BENCH_RUNS=N,
//! default 20; needs `ci/build-artefacts.sh`).

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use veil_attestation::{
    client::{Attester, AttesterError, KbsClient, TcpConnector, Transport},
    Tee,
};
use veil_benches::{report, runs, summarize};
use veil_protocol::{
    agent::{AttestRequest, CheckRequest},
    agent_ttrpc::{AttestationClient, HealthClient},
};
use veil_shim::config::TeeKind;
use veil_test_support::{kbs::KbsSetup, Artefacts, TestVm, VmOptions};
use veil_verifier::sim_ca::SimChip;

/// Signs simulated evidence in process (the host baseline).
struct InProcess {
    chip: SimChip,
    measurement: [u8; 48],
}

impl Attester for InProcess {
    fn tee(&self) -> Tee {
        Tee::VeilSim
    }

    fn evidence<'a>(
        &'a self,
        report_data: [u8; 64],
    ) -> Pin<
        Box<dyn std::future::Future<Output = Result<serde_json::Value, AttesterError>> + Send + 'a>,
    > {
        Box::pin(async move { Ok(self.chip.evidence(&report_data, &self.measurement, None)) })
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(120).as_nanos() as i64)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = Artefacts::locate()?;
    let n = runs(20);
    let setup = KbsSetup::new(&a)?;
    let h = setup.handler(&[("disk-key", "default/key/disk")]);
    let mut opts = VmOptions::agent(&a);
    opts.extra_cmdline = setup.words(&h)?;
    let vm = TestVm::boot(&a, &opts)?;
    let reference = setup.add_reference("bench", &vm.launch_info(TeeKind::Sim))?;
    setup.add_resource("default/key/disk", &[0x42; 32])?;
    setup.set_policy(
        "[[resource]]\npath = \"default/key/disk\"\ntee = [\"veil-sim\"]\nreference_values = [\"bench\"]\nallow_simulated = true\n",
    )?;
    let broker = setup.start()?;
    let _services = setup.serve_vm(&vm, &broker)?;
    let client = vm.agent_client(Duration::from_secs(90)).await?;
    let attest = AttestationClient::new(client.clone());
    let health = HealthClient::new(client);

    let mut req = AttestRequest::new();
    let t = Instant::now();
    let first = attest
        .attest(ctx(), &req)
        .await
        .context("first attestation")?;
    let cold = t.elapsed();
    anyhow::ensure!(first.measurement == reference, "unexpected measurement");
    req.refresh = true;

    let mut measurement = [0u8; 48];
    hex::decode_to_slice(&reference, &mut measurement)?;
    let host_attester = Arc::new(InProcess {
        chip: SimChip::load(&setup.sim_ca())?,
        measurement,
    });
    let pin: [u8; 32] = {
        use sha2::Digest;
        sha2::Sha256::digest(std::fs::read(setup.cert_der())?).into()
    };

    let (mut guest, mut rpc, mut host, mut check) = (vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let t = Instant::now();
        let r = attest.attest(ctx(), &req).await?;
        rpc.push(t.elapsed());
        guest.push(Duration::from_micros(r.duration_us));

        let t = Instant::now();
        let mut c = KbsClient::new(
            Box::new(TcpConnector {
                addr: broker.addr.clone(),
            }),
            Transport::TlsSha256 {
                cert_sha256: pin,
                server_name: "kbs".into(),
            },
            "kbs",
        )?;
        c.attest(host_attester.as_ref()).await?;
        c.get_resource("default", "key", "disk").await?;
        host.push(t.elapsed());

        let t = Instant::now();
        health.check(ctx(), &CheckRequest::new()).await?;
        check.push(t.elapsed());
        eprintln!(
            "run {}/{n}: guest {:?}, Attest RPC {:?}, host process {:?}, Health.Check {:?}",
            i + 1,
            guest[i],
            rpc[i],
            host[i],
            check[i]
        );
    }
    println!(
        "attestation round trip (auth, evidence, attest, resource, JWE), {n} runs, accel {:?}",
        vm.accel
    );
    println!("first attestation of the pod (Attest RPC, host clock): {cold:?}");
    report("in the guest (agent's clock)", &summarize(&guest));
    report("Attest RPC (host clock)", &summarize(&rpc));
    report("baseline: host process, no VM", &summarize(&host));
    report(
        "baseline: Health.Check RPC to the guest",
        &summarize(&check),
    );
    Ok(())
}
