//! CRI runs a pod in one veil microVM: a Rust CRI client (`k8s-cri`) against
//! the private containerd runs a pod sandbox with `runtime_handler = "veil"`,
//! creates and starts two containers, execs into one, reads their status,
//! stops them and removes the pod — and both containers ran in the same VM
//! (one QEMU process). Afterwards nothing of the pod is left.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_cri::v1::{
    ContainerState, CreateContainerRequest, ExecSyncRequest, RemovePodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
};
use veil_tests::{
    containerd::{processes, Containerd},
    Artefacts,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_runs_a_pod_of_two_containers_in_one_veil_vm() -> Result<()> {
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let result = scenario(&c).await;
    if result.is_err() {
        eprintln!("containerd log:\n{}", c.log_text());
    }
    result
}

async fn scenario(c: &Containerd) -> Result<()> {
    let work = tempfile::tempdir()?;
    veil_tests::cri::import_pod_images(c, work.path())?;
    let logs = work.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let logs = logs.display().to_string();
    let mut cri = veil_tests::cri::client(c).await?;

    // The pod has a network namespace of its own (the test CNI's).
    let pod_config = veil_tests::cri::pod_config("veil-pod", "uid-1", "veilpod", &logs);
    let pod = veil_tests::cri::run_pod(&mut cri, "veil", &pod_config).await?;

    let mut ids = Vec::new();
    for (name, cmd) in [
        ("one", vec!["sh", "-c", "echo one-started; exec sleep 1000"]),
        ("two", vec!["sh", "-c", "echo two-started; exec sleep 1000"]),
    ] {
        let id = cri
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(veil_tests::cri::busybox_container(name, &cmd)),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .with_context(|| format!("CreateContainer {name}"))?
            .into_inner()
            .container_id;
        cri.start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .with_context(|| format!("StartContainer {name}"))?;
        ids.push(id);
    }

    // Both containers run in the pod's one VM.
    let qemus: Vec<_> = processes()
        .into_iter()
        .filter(|(_, cmd)| {
            cmd.contains("qemu-system") && cmd.contains(&format!("/run/veil/{pod}/"))
        })
        .collect();
    assert_eq!(qemus.len(), 1, "one QEMU for the pod: {qemus:?}");
    let all_qemus = processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system") && cmd.contains("/run/veil/"))
        .filter(|(_, cmd)| ids.iter().any(|id| cmd.contains(id.as_str())))
        .count();
    assert_eq!(all_qemus, 0, "no VM of its own for a pod member");

    let exec = cri
        .exec_sync(ExecSyncRequest {
            container_id: ids[0].clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "echo exec-sync; hostname; exit 4".into(),
            ],
            timeout: 60,
        })
        .await
        .context("ExecSync")?
        .into_inner();
    assert_eq!(
        String::from_utf8_lossy(&exec.stdout),
        "exec-sync\nveilpod\n"
    );
    assert_eq!(exec.exit_code, 4);

    for id in &ids {
        let st = veil_tests::cri::container_status(&mut cri, id).await?;
        assert_eq!(st.state, ContainerState::ContainerRunning as i32, "{st:?}");
    }
    // Their output reached the CRI logs.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let one = std::fs::read_to_string(format!("{logs}/one.log")).unwrap_or_default();
        if one.contains("one-started") {
            break;
        }
        if Instant::now() > deadline {
            bail!("container log: {one:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for id in &ids {
        cri.stop_container(StopContainerRequest {
            container_id: id.clone(),
            timeout: 2,
        })
        .await
        .context("StopContainer")?;
        let st = veil_tests::cri::container_status(&mut cri, id).await?;
        assert_eq!(st.state, ContainerState::ContainerExited as i32, "{st:?}");
    }
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .context("StopPodSandbox")?;
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .context("RemovePodSandbox")?;

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = c.leftovers(&[pod.as_str()]);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("left behind:\n{}", left.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
