//! The pod's request policy through CRI, as the kubelet drives a pod: the
//! policy is written by `veil policy generate` from a Kubernetes pod
//! manifest, carried by the pod's `io.veil.policy` annotation (containerd's
//! `pod_annotations`), bound as the simulated TEE's HOST_DATA, and the
//! broker releases the pod's keys only to that digest. ExecSync of the
//! allowlisted command works, any other is PERMISSION_DENIED with the rule
//! named, a container whose command or environment the policy does not list
//! is refused at CreateContainer, `veil policy check` explains the denial,
//! and a pod with a policy one byte off gets no keys.

use std::{collections::HashMap, path::Path, process::Command};

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, ContainerConfig, CreateContainerRequest,
    ExecSyncRequest, KeyValue, PodSandboxConfig, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::Channel;
use veil_tests::{
    cri, oci,
    storage::{release_policy, Confidential, DISK},
};

const MANIFEST: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: policy-pod
spec:
  enableServiceLinks: false
  automountServiceAccountToken: false
  containers:
  - name: app
    image: IMAGE
    command: ["sleep", "1000"]
    env:
    - name: MODE
      value: prod
"#;

fn veil(env: &Confidential, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(env.a.require_veil_cli()?)
        .args(args)
        .output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pod_runs_only_what_its_generated_policy_allows() -> Result<()> {
    let env = Confidential::new()?;
    let result = scenario(&env).await;
    if result.is_err() {
        eprintln!("containerd log:\n{}", env.c.log_text());
    }
    result
}

async fn run_pod(
    client: &mut RuntimeServiceClient<Channel>,
    config: &PodSandboxConfig,
    policy: &str,
) -> Result<String, tonic::Status> {
    let mut config = config.clone();
    config.annotations = HashMap::from([("io.veil.policy".to_string(), policy.to_string())]);
    Ok(client
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: "veil-sim".into(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id)
}

async fn create(
    client: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    config: &PodSandboxConfig,
    container: ContainerConfig,
) -> Result<String, tonic::Status> {
    Ok(client
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(container),
            sandbox_config: Some(config.clone()),
        })
        .await?
        .into_inner()
        .container_id)
}

/// CreateContainer then StartContainer (where the guest container is
/// made, and so where the agent's policy answers, as runc's errors do).
async fn create_and_start(
    client: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    config: &PodSandboxConfig,
    container: ContainerConfig,
) -> Result<String, tonic::Status> {
    let id = create(client, pod, config, container).await?;
    client
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await?;
    Ok(id)
}

async fn exec_sync(
    client: &mut RuntimeServiceClient<Channel>,
    id: &str,
    cmd: &[&str],
) -> Result<k8s_cri::v1::ExecSyncResponse, tonic::Status> {
    Ok(client
        .exec_sync(ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        })
        .await?
        .into_inner())
}

async fn remove(client: &mut RuntimeServiceClient<Channel>, pod: &str) -> Result<()> {
    client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await?;
    client
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await?;
    Ok(())
}

fn generate(env: &Confidential, dir: &Path, pause: &str, busybox: &str) -> Result<String> {
    let manifest = dir.join("pod.yaml");
    std::fs::write(&manifest, MANIFEST.replace("IMAGE", oci::BUSYBOX_IMAGE))?;
    let out = veil(
        env,
        &[
            "policy",
            "generate",
            &manifest.to_string_lossy(),
            "--pause-image",
            oci::PAUSE_IMAGE,
            "--root-hash",
            &format!("{}={pause}", oci::PAUSE_IMAGE),
            "--root-hash",
            &format!("{}={busybox}", oci::BUSYBOX_IMAGE),
            "--exec",
            "app=cat /proc/loadavg",
        ],
    )?;
    ensure!(
        out.status.success(),
        "veil policy generate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = String::from_utf8(out.stdout)?;
    eprintln!(
        "generated policy:\n{doc}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(doc)
}

async fn scenario(env: &Confidential) -> Result<()> {
    let pause_hash = env.import_for_cri()?;
    let busybox_hash = env.busybox_root_hash()?;
    env.resources_for(&[
        (oci::BUSYBOX_IMAGE, busybox_hash.as_str()),
        (oci::PAUSE_IMAGE, pause_hash.as_str()),
        (veil_shim::spec::POD_SANDBOX_IMAGE, pause_hash.as_str()),
    ])?;
    let dir = env.work.path().join("policy");
    std::fs::create_dir_all(&dir)?;
    let doc = generate(env, &dir, &pause_hash, &busybox_hash)?;
    let policy_file = dir.join("policy.toml");
    std::fs::write(&policy_file, &doc)?;
    let digest = veil(env, &["policy", "digest", &policy_file.to_string_lossy()])?;
    ensure!(digest.status.success(), "veil policy digest failed");
    let digest = String::from_utf8(digest.stdout)?.trim().to_string();

    // Keys only for pods launched with exactly this policy.
    env.register("policy-cri", |_| {})?;
    let release = release_policy("policy-cri").replace(
        "allow_simulated = true",
        &format!("allow_simulated = true\nhost_data = \"{digest}\""),
    );
    env.setup.set_policy(&release)?;
    let broker = env.setup.start()?;
    env.use_broker(&broker.addr)?;

    let logs = env.work.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut client = cri::client(&env.c).await?;
    let config = cri::pod_config("policy-pod", "uid-p", "policypod", &logs.to_string_lossy());
    let pod = run_pod(&mut client, &config, &doc).await.map_err(|s| {
        anyhow::anyhow!(
            "RunPodSandbox: {}\naudit:\n{}",
            s.message(),
            broker.audit_text()
        )
    })?;

    let app = ContainerConfig {
        envs: vec![KeyValue {
            key: "MODE".into(),
            value: "prod".into(),
        }],
        ..cri::busybox_container("app", &["sleep", "1000"])
    };
    let id = create_and_start(&mut client, &pod, &config, app.clone())
        .await
        .context("CreateContainer of the listed container")?;

    // The allowlisted command runs.
    let ok = exec_sync(&mut client, &id, &["cat", "/proc/loadavg"]).await?;
    let text = String::from_utf8_lossy(&ok.stdout);
    ensure!(
        ok.exit_code == 0 && text.split_whitespace().count() == 5,
        "loadavg: {text:?} (exit {})",
        ok.exit_code
    );
    // Any other command is refused with the rule named.
    let denied = exec_sync(&mut client, &id, &["cat", "/data/secret"])
        .await
        .err()
        .context("an exec outside the allowlist ran")?;
    eprintln!("denied ExecSync: {}", denied.message());
    ensure!(
        denied
            .message()
            .contains("ExecProcess denied by the init-data policy")
            && denied.message().contains("rule 'app'"),
        "denial: {denied:?}"
    );
    // ... and `veil policy check` says why.
    let check = veil(
        env,
        &[
            "policy",
            "check",
            &policy_file.to_string_lossy(),
            "--container",
            "app",
            "--",
            "cat",
            "/data/secret",
        ],
    )?;
    let why = String::from_utf8_lossy(&check.stdout);
    ensure!(
        check.status.code() == Some(3) && why.contains("exec allowlist"),
        "veil policy check: {why}"
    );

    // Containers the policy does not list never start: the guest refuses
    // them before anything runs.
    let other_cmd = ContainerConfig {
        metadata: Some(k8s_cri::v1::ContainerMetadata {
            name: "other".into(),
            attempt: 0,
        }),
        command: vec!["sleep".into(), "999".into()],
        ..app.clone()
    };
    let e = create_and_start(&mut client, &pod, &config, other_cmd)
        .await
        .err()
        .context("a container with another command was created")?;
    ensure!(
        e.message().contains("CreateContainer denied") && e.message().contains("process.args"),
        "denial: {}",
        e.message()
    );
    let other_env = ContainerConfig {
        metadata: Some(k8s_cri::v1::ContainerMetadata {
            name: "other-env".into(),
            attempt: 0,
        }),
        envs: vec![KeyValue {
            key: "MODE".into(),
            value: "debug".into(),
        }],
        ..app.clone()
    };
    let e = create_and_start(&mut client, &pod, &config, other_env)
        .await
        .err()
        .context("a container with another environment was created")?;
    ensure!(
        e.message().contains("process.env") && !e.message().contains("debug"),
        "denial: {}",
        e.message()
    );
    let extra = env
        .work
        .path()
        .join("kubelet/pods/uid-p/volumes/kubernetes.io~empty-dir/extra");
    std::fs::create_dir_all(&extra)?;
    let other_mount = ContainerConfig {
        metadata: Some(k8s_cri::v1::ContainerMetadata {
            name: "other-mount".into(),
            attempt: 0,
        }),
        mounts: vec![k8s_cri::v1::Mount {
            container_path: "/extra".into(),
            host_path: extra.display().to_string(),
            ..Default::default()
        }],
        ..app.clone()
    };
    let e = create_and_start(&mut client, &pod, &config, other_mount)
        .await
        .err()
        .context("a container with an unlisted mount was created")?;
    ensure!(
        e.message().contains("mounts") && e.message().contains("/extra"),
        "denial: {}",
        e.message()
    );
    remove(&mut client, &pod).await?;

    // One byte more in the policy: another pod identity, which the broker
    // does not release the disk key to.
    let swapped = format!("{doc}\n");
    let e = run_pod(&mut client, &config, &swapped).await;
    let audit = broker.audit_text();
    ensure!(e.is_err(), "a pod with another policy got its keys");
    ensure!(
        audit.contains(DISK) && audit.to_lowercase().contains("host data"),
        "audit: {audit}"
    );
    // Whatever the failed RunPodSandbox left is removable.
    let pods = client
        .list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest::default())
        .await?
        .into_inner()
        .items;
    for p in pods {
        remove(&mut client, &p.id).await?;
    }
    env.c.wait_clean(&[])?;
    Ok(())
}
