//! Confidential storage through CRI, as the kubelet drives it: a `veil-sim`
//! pod that attests to the real `veil-kbs`, whose image policy lists the
//! busybox and pause images under the names containerd's CRI plugin puts in
//! the specs (`io.kubernetes.cri.image-name`; the pause image as
//! `pod-sandbox`, containerd 1.6 names none), runs two containers that share
//! an emptyDir (a host directory `…/volumes/kubernetes.io~empty-dir/shared`
//! mounted into both). What one writes there the other reads; the host
//! directory stays empty and the pod's host-side scratch file holds a LUKS2
//! header and not the data. Afterwards nothing of the pod is left. The pod's
//! request policy lists both containers and exactly the two exec commands
//! the test runs (a confidential pod allows no other exec).

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::{
    ContainerConfig, CreateContainerRequest, ExecSyncRequest, Mount, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use veil_tests::{
    cri, oci,
    storage::{cri_policy, find, random, scratch_file, Confidential, LUKS_MAGIC},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pod_containers_share_an_encrypted_empty_dir() -> Result<()> {
    let env = Confidential::new()?;
    let result = scenario(&env).await;
    if result.is_err() {
        eprintln!("containerd log:\n{}", env.c.log_text());
    }
    result
}

async fn scenario(env: &Confidential) -> Result<()> {
    let pause_hash = env.import_for_cri()?;
    let busybox_hash = env.busybox_root_hash()?;
    env.resources_for(&[
        (oci::BUSYBOX_IMAGE, busybox_hash.as_str()),
        // containerd 1.7+ names the pause image; 1.6 names none, and the
        // shim keys it as "pod-sandbox".
        (oci::PAUSE_IMAGE, pause_hash.as_str()),
        (veil_shim::spec::POD_SANDBOX_IMAGE, pause_hash.as_str()),
    ])?;
    env.register("cri-pod", |_| {})?;
    let broker = env.start_broker("cri-pod")?;
    let shared = env
        .work
        .path()
        .join("kubelet/pods/uid-s/volumes/kubernetes.io~empty-dir/shared");
    std::fs::create_dir_all(&shared)?;
    let logs = env.work.path().join("logs");
    std::fs::create_dir_all(&logs)?;

    // A confidential pod runs exec only as its policy lists it: exactly the
    // writer's and the reader's commands.
    let secret = format!("veil-cri-secret-{}", hex::encode(random(12)?));
    let write = format!("echo {secret} > /shared/s && echo {secret} > /own && sync && echo ok");
    let read = "cat /shared/s; test ! -e /own && echo apart".to_string();
    let sh = |script: &str| vec!["sh".to_string(), "-c".to_string(), script.to_string()];
    let sleep = vec!["sleep".to_string(), "1000".to_string()];
    let policy = cri_policy(
        &pause_hash,
        &busybox_hash,
        &["/shared"],
        &[
            ("writer", sleep.clone(), vec![sh(&write)]),
            ("reader", sleep, vec![sh(&read)]),
        ],
    );

    let mut client = cri::client(&env.c).await?;
    let mut pod_config = veil_tests::cri::pod_config(
        "storage-pod",
        "uid-s",
        "storagepod",
        &logs.display().to_string(),
    );
    pod_config
        .annotations
        .insert("io.veil.policy".into(), policy);
    let pod = client
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: "veil-sim".into(),
        })
        .await
        .with_context(|| format!("RunPodSandbox; audit:\n{}", broker.audit_text()))?
        .into_inner()
        .pod_sandbox_id;

    let mut ids = Vec::new();
    for name in ["writer", "reader"] {
        let config = ContainerConfig {
            mounts: vec![Mount {
                container_path: "/shared".into(),
                host_path: shared.display().to_string(),
                ..Default::default()
            }],
            ..cri::busybox_container(name, &["sleep", "1000"])
        };
        let id = client
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .with_context(|| format!("CreateContainer {name}"))?
            .into_inner()
            .container_id;
        client
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .with_context(|| format!("StartContainer {name}"))?;
        ids.push(id);
    }

    let exec = |id: &str, script: String| {
        let req = ExecSyncRequest {
            container_id: id.to_string(),
            cmd: vec!["sh".into(), "-c".into(), script],
            timeout: 120,
        };
        let mut c = client.clone();
        async move {
            let r = c.exec_sync(req).await?.into_inner();
            Ok::<_, anyhow::Error>((r.exit_code, String::from_utf8_lossy(&r.stdout).into_owned()))
        }
    };
    let (code, out) = exec(&ids[0], write.clone()).await?;
    ensure!(code == 0 && out == "ok\n", "writer: {code} {out:?}");
    let (code, out) = exec(&ids[1], read.clone()).await?;
    ensure!(
        code == 0 && out == format!("{secret}\napart\n"),
        "reader: {code} {out:?}"
    );

    ensure!(
        std::fs::read_dir(&shared)?.next().is_none(),
        "the host emptyDir directory got files"
    );
    let disk = std::fs::read(scratch_file(&env.c, &pod))?;
    ensure!(disk.starts_with(LUKS_MAGIC), "no LUKS2 header");
    ensure!(
        find(&disk, secret.as_bytes()).is_none(),
        "the secret is in the host-side scratch file"
    );
    let releases = broker
        .audit_events()
        .into_iter()
        .filter(|e| e["outcome"] == "release")
        .count();
    ensure!(releases == 2, "{}", broker.audit_text());

    client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .context("StopPodSandbox")?;
    client
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .context("RemovePodSandbox")?;
    env.c.wait_clean(&[pod.as_str()])
}
