//! A CRI client (`k8s-cri` over tonic) to the private containerd's socket,
//! for tests that drive pods the way the kubelet does.

use anyhow::{Context, Result};
use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, ContainerConfig, ContainerMetadata,
    ContainerStatus, ContainerStatusRequest, ImageSpec, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, RunPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{containerd::Containerd, oci};

/// Imports what a CRI pod of the test images needs (busybox and the pause
/// image) into containerd's `k8s.io` namespace, built under `work`.
pub fn import_pod_images(c: &Containerd, work: &std::path::Path) -> Result<()> {
    c.import("k8s.io", &oci::busybox_archive(work)?)?;
    c.import("k8s.io", &oci::pause_archive(work)?)
}

/// Connects to `c`'s CRI runtime service.
pub async fn client(c: &Containerd) -> Result<RuntimeServiceClient<Channel>> {
    let path = c.socket.clone();
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .context("connecting to containerd's CRI")?;
    Ok(RuntimeServiceClient::new(channel))
}

/// Runs a pod sandbox of `config` with runtime `handler`; returns its id.
pub async fn run_pod(
    cri: &mut RuntimeServiceClient<Channel>,
    handler: &str,
    config: &PodSandboxConfig,
) -> Result<String> {
    Ok(cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        })
        .await
        .with_context(|| format!("RunPodSandbox on {handler}"))?
        .into_inner()
        .pod_sandbox_id)
}

/// The CRI status of container `id`.
pub async fn container_status(
    cri: &mut RuntimeServiceClient<Channel>,
    id: &str,
) -> Result<ContainerStatus> {
    cri.container_status(ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .with_context(|| format!("ContainerStatus of {id}"))?
    .into_inner()
    .status
    .with_context(|| format!("no status for {id}"))
}

/// A pod sandbox config: `name`/`uid` in namespace `default`, `hostname`,
/// container logs under `log_directory`, a network namespace of the pod's
/// own (the test containerd's CNI gives it an `eth0` and `lo`), a PID namespace per
/// container, a shared IPC namespace.
pub fn pod_config(name: &str, uid: &str, hostname: &str, log_directory: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: hostname.into(),
        log_directory: log_directory.into(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A busybox container running `cmd`; its log goes to
/// `<pod log directory>/<name>.log`.
pub fn busybox_container(name: &str, cmd: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: crate::oci::BUSYBOX_IMAGE.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// Runs `script` with `sh -c` in container `id` (ExecSync, 60 s): stdout,
/// stderr, exit code.
pub async fn exec(
    cri: &mut RuntimeServiceClient<Channel>,
    id: &str,
    script: &str,
) -> Result<(String, String, i32)> {
    let r = cri
        .exec_sync(k8s_cri::v1::ExecSyncRequest {
            container_id: id.into(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout: 60,
        })
        .await
        .with_context(|| format!("ExecSync {script:?} in {id}"))?
        .into_inner();
    Ok((
        String::from_utf8_lossy(&r.stdout).into_owned(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
        r.exit_code,
    ))
}

/// Creates container `config` in pod `pod` (of `pod_config`); its id.
pub async fn create_container(
    cri: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    pod_config: &PodSandboxConfig,
    config: ContainerConfig,
) -> Result<String> {
    let name = config.metadata.as_ref().map(|m| m.name.clone());
    Ok(cri
        .create_container(k8s_cri::v1::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .with_context(|| format!("CreateContainer {name:?}"))?
        .into_inner()
        .container_id)
}

/// Starts container `id`.
pub async fn start_container(cri: &mut RuntimeServiceClient<Channel>, id: &str) -> Result<()> {
    cri.start_container(k8s_cri::v1::StartContainerRequest {
        container_id: id.into(),
    })
    .await
    .with_context(|| format!("StartContainer {id}"))?;
    Ok(())
}

/// Stops and removes pod `pod`.
pub async fn remove_pod(cri: &mut RuntimeServiceClient<Channel>, pod: &str) -> Result<()> {
    cri.stop_pod_sandbox(k8s_cri::v1::StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .with_context(|| format!("StopPodSandbox {pod}"))?;
    cri.remove_pod_sandbox(k8s_cri::v1::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .with_context(|| format!("RemovePodSandbox {pod}"))?;
    Ok(())
}
