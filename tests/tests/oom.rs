//! A container killed for lack of memory in a `veil` pod reaches containerd
//! as an OOM event (`/tasks/oom`, what CRI turns into the `OOMKilled`
//! reason), not only as a plain exit 137.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use veil_tests::{
    containerd::{output_text, Containerd},
    oci, Artefacts,
};

const NS: &str = "veil-test";

#[test]
fn an_oom_killed_container_produces_containerds_oom_event() -> Result<()> {
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    c.import(NS, &oci::busybox_archive(work.path())?)?;
    let rt = c.runtime_config("veil");

    let mut events = c
        .ctr(NS)
        .arg("events")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("ctr events")?;
    let stdout = events.stdout.take().context("ctr events stdout")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // 32 MiB limit; dd fills a 64 MiB buffer at once (a VM of 256 MiB has
    // room for it, so without the limit it would survive).
    let run = c
        .ctr(NS)
        .args(["run", "--rm", "--runtime", "io.containerd.veil.v2"])
        .args(["--runtime-config-path", &rt, "--memory-limit", "33554432"])
        .args([oci::BUSYBOX_IMAGE, "oom-1", "sh", "-c"])
        .arg("dd if=/dev/zero of=/dev/null bs=67108864 count=1 && echo survived")
        .output()?;
    let mut seen = Vec::new();
    let mut oom = false;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        if line.contains("/tasks/oom") && line.contains("oom-1") {
            eprintln!("event: {line}");
            oom = true;
        }
        seen.push(line);
        if oom {
            break;
        }
    }
    let _ = events.kill();
    let _ = events.wait();
    let _ = reader.join();
    let result = (|| {
        if String::from_utf8_lossy(&run.stdout).contains("survived") {
            bail!(
                "the container was not OOM-killed (limit not applied?): {}",
                output_text(&run)
            );
        }
        if !oom {
            bail!(
                "no /tasks/oom event for oom-1; run: {}\nevents:\n{}",
                output_text(&run),
                seen.join("\n")
            );
        }
        c.wait_clean(&["oom-1"])
    })();
    result
}

/// Through CRI, as kubelet sees it: the container's status says `OOMKilled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_reports_an_oom_killed_container_as_oomkilled() -> Result<()> {
    use k8s_cri::v1::{
        ContainerState, LinuxContainerConfig, LinuxContainerResources, RemovePodSandboxRequest,
        StopPodSandboxRequest,
    };
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    veil_tests::cri::import_pod_images(&c, work.path())?;
    let logs = work.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let logs = logs.display().to_string();
    let mut cri = veil_tests::cri::client(&c).await?;
    let pod_config = veil_tests::cri::pod_config("oom-pod", "uid-oom", "oompod", &logs);
    let pod = veil_tests::cri::run_pod(&mut cri, "veil", &pod_config).await?;
    let result = async {
        // dd fills a 64 MiB buffer at once: over the 32 MiB limit, inside
        // the VM's 256 MiB (without the limit it completes).
        let mut config = veil_tests::cri::busybox_container(
            "hog",
            &[
                "dd",
                "if=/dev/zero",
                "of=/dev/null",
                "bs=67108864",
                "count=1",
            ],
        );
        config.linux = Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: 32 * 1024 * 1024,
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = veil_tests::cri::create_container(&mut cri, &pod, &pod_config, config).await?;
        veil_tests::cri::start_container(&mut cri, &id).await?;
        let started = std::time::Instant::now();
        let deadline = started + Duration::from_secs(60);
        loop {
            let st = veil_tests::cri::container_status(&mut cri, &id).await?;
            if st.state == ContainerState::ContainerExited as i32 {
                if st.reason != "OOMKilled" {
                    bail!(
                        "container exited with reason {:?} (exit {}), not OOMKilled",
                        st.reason,
                        st.exit_code
                    );
                }
                eprintln!("OOMKilled after {:.1?}", started.elapsed());
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("container still {:?} after 60 s", st.state);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    .await;
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
    result?;
    c.wait_clean(&[pod.as_str()])
}

/// A memory limit no process can start under (1 byte, as `--memory-limit
/// 1`) fails the task create with an error that names the limit, as runc's
/// does, and leaves nothing.
#[test]
fn an_impossible_memory_limit_fails_at_create_naming_it() -> Result<()> {
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    c.import(NS, &oci::busybox_archive(work.path())?)?;
    let rt = c.runtime_config("veil");
    let mut texts = Vec::new();
    for (runtime, id) in [("runc", "mem-runc"), ("veil", "mem-veil")] {
        let mut cmd = if runtime == "veil" {
            c.ctr_run(NS, &rt)
        } else {
            let mut r = c.ctr(NS);
            r.args(["run", "--runtime", "io.containerd.runc.v2"]);
            r
        };
        let out = cmd
            .args(["--memory-limit", "1", oci::BUSYBOX_IMAGE, id, "true"])
            .output()?;
        let text = output_text(&out);
        eprintln!("{runtime}: {text}");
        let _ = c.ctr(NS).args(["task", "delete", id]).output();
        let _ = c.ctr(NS).args(["container", "rm", id]).output();
        if out.status.success() {
            bail!("{runtime} ran a container under a 1-byte memory limit: {text}");
        }
        texts.push(text);
    }
    c.wait_clean(&["mem-veil"])?;
    let veil = &texts[1];
    for want in ["memory", "limit"] {
        if !veil.contains(want) {
            bail!("veil's error does not name the {want}: {veil}");
        }
    }
    if veil.contains("Status {") || veil.contains("helper ended") {
        bail!("veil's error is not readable: {veil}");
    }
    Ok(())
}
