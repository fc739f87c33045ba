//! Pod semantics the kubelet relies on, through CRI with the real containerd,
//! each case run on `runc` and on `veil` pods of the same containerd in the
//! same test and compared: host-namespace pods (refused by veil, naming the
//! option, nothing left behind), StopContainer of `top` and the answers to
//! stopping or removing a container twice, privileged containers (the guest's
//! devices, bridges and VLANs) and added capabilities, the pod's shared PID
//! namespace, and pod sysctls seen by every container.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, Capability, ContainerConfig, ContainerState,
    ContainerStatusRequest, CreateContainerRequest, LinuxContainerConfig,
    LinuxContainerSecurityContext, NamespaceMode, NamespaceOption, PodSandboxConfig,
    RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::Channel;
use veil_tests::{containerd::Containerd, cri, oci, Artefacts};

/// The handlers every case runs on: the reference first.
const HANDLERS: [&str; 2] = ["runc", "veil"];

/// A private containerd with the test images, and a CRI client to it.
struct Node {
    c: Containerd,
    cri: RuntimeServiceClient<Channel>,
    work: tempfile::TempDir,
    pods: Vec<String>,
}

impl Node {
    async fn start() -> Result<Self> {
        let a = Artefacts::locate()?;
        let c = Containerd::start(&a)?;
        let work = tempfile::tempdir()?;
        c.import("k8s.io", &oci::busybox_archive(work.path())?)?;
        c.import("k8s.io", &oci::pause_archive(work.path())?)?;
        std::fs::create_dir_all(work.path().join("logs"))?;
        let cri = cri::client(&c).await?;
        Ok(Node {
            c,
            cri,
            work,
            pods: Vec::new(),
        })
    }

    fn pod_config(&self, name: &str) -> PodSandboxConfig {
        let logs = self.work.path().join("logs").join(name);
        let _ = std::fs::create_dir_all(&logs);
        cri::pod_config(
            name,
            &format!("uid-{name}"),
            name,
            &logs.display().to_string(),
        )
    }

    async fn run_pod(&mut self, handler: &str, config: &PodSandboxConfig) -> Result<String> {
        let id = cri::run_pod(&mut self.cri, handler, config).await?;
        self.pods.push(id.clone());
        Ok(id)
    }

    async fn create(
        &mut self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> Result<String> {
        cri::create_container(&mut self.cri, pod, pod_config, config).await
    }

    async fn run(
        &mut self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> Result<String> {
        let id = self.create(pod, pod_config, config).await?;
        self.cri
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .context("StartContainer")?;
        Ok(id)
    }

    /// Runs `script` with `sh -c` in container `id`: (stdout, stderr, exit code).
    async fn exec(&mut self, id: &str, script: &str) -> Result<(String, String, i32)> {
        cri::exec(&mut self.cri, id, script).await
    }

    /// [`Self::exec`] that must succeed; its stdout.
    async fn exec_ok(&mut self, id: &str, script: &str) -> Result<String> {
        let (out, err, code) = self.exec(id, script).await?;
        ensure!(
            code == 0,
            "{script:?} exited {code}: stdout {out:?} stderr {err:?}"
        );
        Ok(out)
    }

    async fn remove_pod(&mut self, pod: &str) -> Result<()> {
        self.cri
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await
            .context("StopPodSandbox")?;
        self.cri
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await
            .context("RemovePodSandbox")?;
        self.pods.retain(|p| p != pod);
        Ok(())
    }

    /// Removes the pods still there, then checks nothing of `veil_pods` is left.
    async fn finish(mut self, veil_pods: &[String]) -> Result<()> {
        for p in self.pods.clone() {
            self.remove_pod(&p).await?;
        }
        let pods: Vec<&str> = veil_pods.iter().map(String::as_str).collect();
        self.c.wait_clean(&pods)
    }
}

/// Runs `scenario` on a fresh [`Node`], printing containerd's log on failure.
async fn on_node<F>(scenario: F) -> Result<()>
where
    F: for<'a> FnOnce(
        &'a mut Node,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Vec<String>>> + Send + 'a>,
    >,
{
    let mut node = Node::start().await?;
    let result = scenario(&mut node).await;
    match result {
        Ok(veil_pods) => node.finish(&veil_pods).await,
        Err(e) => {
            eprintln!("containerd log:\n{}", node.c.log_text());
            let pods = node.pods.clone();
            for p in pods {
                let _ = node.remove_pod(&p).await;
            }
            Err(e)
        }
    }
}

fn namespaces(config: &mut PodSandboxConfig) -> &mut NamespaceOption {
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .namespace_options
        .get_or_insert_with(Default::default)
}

/// A pod whose containers may be privileged.
fn make_privileged(config: &mut PodSandboxConfig) {
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .privileged = true;
}

fn with_security(
    mut config: ContainerConfig,
    f: impl FnOnce(&mut LinuxContainerSecurityContext),
) -> ContainerConfig {
    let linux = config
        .linux
        .get_or_insert_with(LinuxContainerConfig::default);
    f(linux.security_context.get_or_insert_with(Default::default));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_namespace_pods_are_refused_naming_the_option_and_leave_nothing() -> Result<()> {
    on_node(|n| Box::pin(host_namespaces(n))).await
}

async fn host_namespaces(n: &mut Node) -> Result<Vec<String>> {
    type Set = fn(&mut NamespaceOption);
    let cases: [(&str, Set); 3] = [
        ("hostNetwork", |o| o.network = NamespaceMode::Node as i32),
        ("hostPID", |o| o.pid = NamespaceMode::Node as i32),
        ("hostIPC", |o| o.ipc = NamespaceMode::Node as i32),
    ];
    for (i, (option, set)) in cases.iter().enumerate() {
        let mut config = n.pod_config(&format!("host{i}"));
        set(namespaces(&mut config));
        if *option == "hostNetwork" {
            // The kubelet sets no hostname for a pod on the node's network
            // (it shares the node's UTS namespace; runc refuses one).
            config.hostname.clear();
        }
        // runc runs such a pod: the request is a valid one.
        let pod = n
            .run_pod("runc", &config)
            .await
            .with_context(|| format!("a runc pod with {option}"))?;
        n.remove_pod(&pod).await?;

        let refused = n
            .cri
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: "veil".into(),
            })
            .await;
        let status = match refused {
            Ok(r) => {
                let id = r.into_inner().pod_sandbox_id;
                n.pods.push(id.clone());
                bail!("veil ran a pod with {option}: {id}");
            }
            Err(s) => s,
        };
        eprintln!("{option}: {}", status.message());
        ensure!(
            status.message().contains(option) && status.message().contains("not supported"),
            "the refusal does not name {option}: {}",
            status.message()
        );
        // Nothing was started or kept: no VM, no shim, no pod directory.
        n.c.wait_clean(&[])?;
        ensure!(
            n.c.new_pod_dirs().is_empty(),
            "pod directories left: {:?}",
            n.c.new_pod_dirs()
        );
    }
    Ok(Vec::new())
}

/// What StopContainer and the repeated stops and removes answered.
#[derive(Debug, PartialEq, Eq)]
struct StopAnswers {
    exit_code: i32,
    reason: String,
    stop_again: Option<tonic::Code>,
    remove: Option<tonic::Code>,
    remove_again: Option<tonic::Code>,
    stop_removed: Option<tonic::Code>,
    status_removed: Option<tonic::Code>,
}

fn code<T>(r: &std::result::Result<T, tonic::Status>) -> Option<tonic::Code> {
    r.as_ref().err().map(tonic::Status::code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_of_top_and_repeated_stop_and_remove_answer_as_with_runc() -> Result<()> {
    on_node(|n| Box::pin(stop_and_remove(n))).await
}

async fn stop_and_remove(n: &mut Node) -> Result<Vec<String>> {
    // Long enough that a stop which waited for it (and then killed) is told
    // apart from one that did not.
    const GRACE: i64 = 30;
    let mut answers = Vec::new();
    let mut veil_pods = Vec::new();
    // top as PID 1 of its own PID namespace, on a terminal (as `kubectl
    // run -it`), and as one process of the pod's shared PID namespace.
    for (variant, tty, pid) in [
        ("plain", false, NamespaceMode::Container),
        ("tty", true, NamespaceMode::Container),
        ("podpid", false, NamespaceMode::Pod),
    ] {
        for handler in HANDLERS {
            let mut config = n.pod_config(&format!("stop-{variant}-{handler}"));
            namespaces(&mut config).pid = pid as i32;
            let pod = n.run_pod(handler, &config).await?;
            if handler == "veil" {
                veil_pods.push(pod.clone());
            }
            let top = ContainerConfig {
                tty,
                stdin: tty,
                ..with_security(cri::busybox_container("top", &["top"]), |s| {
                    s.namespace_options = Some(NamespaceOption {
                        network: NamespaceMode::Pod as i32,
                        pid: pid as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    })
                })
            };
            let id = n.run(&pod, &config, top).await?;
            // top is up and has its SIGTERM handler before it is stopped.
            let deadline = Instant::now() + Duration::from_secs(30);
            while n.exec(&id, "grep -q . /proc/1/status").await?.2 != 0 {
                ensure!(Instant::now() < deadline, "top did not come up");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let t = Instant::now();
            n.cri
                .stop_container(StopContainerRequest {
                    container_id: id.clone(),
                    timeout: GRACE,
                })
                .await
                .with_context(|| format!("StopContainer of top on {handler}"))?;
            let took = t.elapsed();
            ensure!(
                took < Duration::from_secs(GRACE as u64),
                "StopContainer of top on {handler} waited the whole grace period ({took:?})"
            );
            let st = cri::container_status(&mut n.cri, &id).await?;
            ensure!(
                st.state == ContainerState::ContainerExited as i32,
                "{handler}: {st:?}"
            );
            let stop = |id: &str| StopContainerRequest {
                container_id: id.into(),
                timeout: GRACE,
            };
            let stop_again = code(&n.cri.stop_container(stop(&id)).await);
            let remove = code(
                &n.cri
                    .remove_container(RemoveContainerRequest {
                        container_id: id.clone(),
                    })
                    .await,
            );
            let remove_again = code(
                &n.cri
                    .remove_container(RemoveContainerRequest {
                        container_id: id.clone(),
                    })
                    .await,
            );
            let stop_removed = code(&n.cri.stop_container(stop(&id)).await);
            let status_removed = code(
                &n.cri
                    .container_status(ContainerStatusRequest {
                        container_id: id.clone(),
                        verbose: false,
                    })
                    .await,
            );
            let a = StopAnswers {
                exit_code: st.exit_code,
                reason: st.reason.clone(),
                stop_again,
                remove,
                remove_again,
                stop_removed,
                status_removed,
            };
            eprintln!("{variant} {handler}: stop took {took:?}, {a:?}");
            answers.push(a);
            n.remove_pod(&pod).await?;
        }
        let (runc, veil) = (&answers[answers.len() - 2], &answers[answers.len() - 1]);
        ensure!(
            runc == veil,
            "{variant}: veil answered differently from runc:\nrunc: {runc:?}\nveil: {veil:?}"
        );
        // top handles SIGTERM: it was not killed after the grace period.
        ensure!(veil.exit_code != 137, "{variant}: {veil:?}");
    }
    Ok(veil_pods)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_and_net_admin_containers_manage_links_as_with_runc() -> Result<()> {
    on_node(|n| Box::pin(privileged(n))).await
}

/// Creates a bridge, a veth pair with one end on the bridge, a macvlan on
/// the other end and a tap device (`tunctl`), then lists them. (busybox `ip` names a
/// veth peer itself: `veth0`. VLANs: see [`VLAN`].)
const LINKS: &str = "ip link add br0 type bridge && ip link add v0 type veth \
    && ip link set v0 master br0 && ip link add m0 link veth0 type macvlan \
    && tunctl -t t0 >/dev/null \
    && for l in br0 v0 veth0 m0 t0; do ip -o link show $l | cut -d: -f2; done";

/// An 802.1Q VLAN on the veth end: the guest kernel has it; the kernel of
/// the machine the tests run on may not (runc's result is not compared).
const VLAN: &str =
    "ip link add link veth0 name veth0.10 type vlan id 10 && ip -o link show veth0.10";

async fn privileged(n: &mut Node) -> Result<Vec<String>> {
    let mut veil_pods = Vec::new();
    let mut listings = Vec::new();
    let mut caps = Vec::new();
    for handler in HANDLERS {
        let mut config = n.pod_config(&format!("priv-{handler}"));
        make_privileged(&mut config);
        let pod = n.run_pod(handler, &config).await?;
        if handler == "veil" {
            veil_pods.push(pod.clone());
        }
        let privileged = with_security(
            cri::busybox_container("privileged", &["sleep", "1000"]),
            |s| s.privileged = true,
        );
        let p = n.run(&pod, &config, privileged).await?;
        let links = n.exec_ok(&p, LINKS).await?;
        listings.push(links);
        let vlan = n.exec(&p, VLAN).await?;
        eprintln!("{handler}: VLAN {vlan:?}");
        if handler == "veil" {
            ensure!(vlan.2 == 0, "veil: no VLAN in the guest: {vlan:?}");
        }

        // The devices it sees are the kernel's it runs on: every block
        // device of its sysfs has its node.
        let missing = n
            .exec_ok(
                &p,
                "for b in /sys/block/*; do [ -b /dev/${b##*/} ] || echo ${b##*/}; done",
            )
            .await?;
        ensure!(
            missing.trim().is_empty(),
            "{handler}: block devices without a node in /dev: {missing}"
        );
        caps.push(n.exec_ok(&p, "grep CapEff /proc/self/status").await?);
        let has_kvm = n.exec(&p, "[ -c /dev/kvm ]").await?.2 == 0;
        // The host has /dev/kvm (tests run QEMU); the guest has no KVM.
        ensure!(
            has_kvm == (handler == "runc"),
            "{handler}: /dev/kvm in the privileged container: {has_kvm}"
        );

        // An added NET_ADMIN is enough for a bridge; without it, refused.
        let admin = with_security(
            cri::busybox_container("netadmin", &["sleep", "1000"]),
            |s| {
                s.capabilities = Some(Capability {
                    add_capabilities: vec!["NET_ADMIN".into()],
                    ..Default::default()
                })
            },
        );
        let a = n.run(&pod, &config, admin).await?;
        n.exec_ok(&a, "ip link add br1 type bridge && ip link show br1")
            .await?;
        let plain = n
            .run(
                &pod,
                &config,
                cri::busybox_container("plain", &["sleep", "1000"]),
            )
            .await?;
        let (out, err, code) = n.exec(&plain, "ip link add br2 type bridge").await?;
        ensure!(
            code != 0 && err.contains("Operation not permitted"),
            "{handler}: a container without NET_ADMIN made a bridge: {code} {out:?} {err:?}"
        );
        n.remove_pod(&pod).await?;
    }
    // Every capability, as runc gives.
    ensure!(caps[0] == caps[1], "capabilities differ: {caps:?}");
    ensure!(
        listings[0].split_whitespace().collect::<Vec<_>>()
            == listings[1].split_whitespace().collect::<Vec<_>>(),
        "links differ:\nrunc: {}\nveil: {}",
        listings[0],
        listings[1]
    );
    Ok(veil_pods)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_pid_namespace_and_sysctls_as_with_runc() -> Result<()> {
    on_node(|n| Box::pin(pid_and_sysctls(n))).await
}

/// What a container of the pod sees: PID 1's command, the commands of the
/// other processes, the pod sysctls, the hostname.
const LOOK: &str = "tr '\\0' ' ' </proc/1/cmdline; echo; \
    for p in /proc/[0-9]*; do [ -r $p/cmdline ] && tr '\\0' ' ' <$p/cmdline && echo; done \
    | grep -E '^(sleep [0-9]+|/pause) $' | sort | tr '\\n' ';'; echo; \
    cat /proc/sys/kernel/shm_rmid_forced /proc/sys/fs/mqueue/msg_max; hostname";

async fn pid_and_sysctls(n: &mut Node) -> Result<Vec<String>> {
    let mut veil_pods = Vec::new();
    let mut seen = Vec::new();
    for handler in HANDLERS {
        for shared in [true, false] {
            let name = format!("pid-{handler}-{}", if shared { "pod" } else { "ctr" });
            let mut config = n.pod_config(&name);
            config.hostname = "podhost".into();
            let pid_mode = if shared {
                NamespaceMode::Pod
            } else {
                NamespaceMode::Container
            };
            namespaces(&mut config).pid = pid_mode as i32;
            let linux = config.linux.get_or_insert_with(Default::default);
            linux
                .sysctls
                .insert("kernel.shm_rmid_forced".into(), "1".into());
            linux
                .sysctls
                .insert("fs.mqueue.msg_max".into(), "37".into());
            let pod = n.run_pod(handler, &config).await?;
            if handler == "veil" {
                veil_pods.push(pod.clone());
            }
            let mode = NamespaceOption {
                network: NamespaceMode::Pod as i32,
                pid: pid_mode as i32,
                ipc: NamespaceMode::Pod as i32,
                ..Default::default()
            };
            let mut ids = Vec::new();
            for (c, secs) in [("one", "1001"), ("two", "1002")] {
                let cfg = with_security(cri::busybox_container(c, &["sleep", secs]), |s| {
                    s.namespace_options = Some(mode.clone())
                });
                ids.push(n.run(&pod, &config, cfg).await?);
            }
            let mut views = Vec::new();
            for id in &ids {
                views.push(n.exec_ok(id, LOOK).await?);
            }
            eprintln!("{handler} shared={shared}: {views:?}");
            seen.push(views);
            n.remove_pod(&pod).await?;
        }
    }
    // runc: [pod views, container views], then veil's.
    ensure!(
        seen[0] == seen[2] && seen[1] == seen[3],
        "veil's containers see something else than runc's:\nrunc {:?}\nveil {:?}",
        &seen[..2],
        &seen[2..]
    );
    // And what they see is what the feature means: with pod sharing, pause
    // is PID 1 and both containers' processes are there; without, a
    // container's command is PID 1 and it sees only its own. The pod's IPC
    // sysctls and hostname are there either way.
    let pod_view = "/pause \n/pause ;sleep 1001 ;sleep 1002 ;\n1\n37\npodhost\n";
    ensure!(
        seen[2] == [pod_view, pod_view],
        "shared PID namespace: {:?}",
        seen[2]
    );
    let own = |n: &str| format!("sleep {n} \nsleep {n} ;\n1\n37\npodhost\n");
    ensure!(
        seen[3] == [own("1001"), own("1002")],
        "own PID namespaces: {:?}",
        seen[3]
    );
    Ok(veil_pods)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_program_fails_in_the_task_create_naming_it_as_with_runc() -> Result<()> {
    on_node(|n| Box::pin(missing_program(n))).await
}

/// Where creating and starting a container of a missing program failed,
/// and the message.
async fn create_and_start(
    n: &mut Node,
    pod: &str,
    config: &PodSandboxConfig,
    prog: &str,
) -> Result<(&'static str, String)> {
    let created = n
        .cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(cri::busybox_container("noprog", &[prog])),
            sandbox_config: Some(config.clone()),
        })
        .await;
    let id = match created {
        Ok(r) => r.into_inner().container_id,
        Err(s) => return Ok(("create", s.message().to_string())),
    };
    let started = n
        .cri
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await;
    n.cri
        .remove_container(RemoveContainerRequest { container_id: id })
        .await
        .context("RemoveContainer")?;
    match started {
        Ok(_) => bail!("{prog} started"),
        Err(s) => Ok(("start", s.message().to_string())),
    }
}

async fn missing_program(n: &mut Node) -> Result<Vec<String>> {
    let mut veil_pods = Vec::new();
    for handler in HANDLERS {
        let config = n.pod_config(&format!("noprog-{handler}"));
        let pod = n.run_pod(handler, &config).await?;
        if handler == "veil" {
            veil_pods.push(pod.clone());
        }
        for prog in ["no-such-program", "/bin/no-such-program"] {
            let (step, message) = create_and_start(n, &pod, &config, prog).await?;
            eprintln!("{handler} {prog}: fails at {step}: {message}");
            ensure!(
                message.contains(prog),
                "{handler}: the error does not name {prog}: {message}"
            );
            // containerd's CRI makes the task (the runtime's create) at
            // StartContainer: runc fails there in `runc create`, veil in the
            // task Create, when the agent looks the program up before the
            // container reports ready (not later, at its start).
            ensure!(step == "start", "{handler}: {prog} failed at {step}");
            if handler == "veil" {
                ensure!(
                    message.contains("agent CreateContainer failed")
                        && message.contains("executable file"),
                    "veil: {prog} did not fail in the task create: {message}"
                );
            }
        }
        n.remove_pod(&pod).await?;
    }
    Ok(veil_pods)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_a_terminal_names_a_dev_pts_device_as_with_runc() -> Result<()> {
    on_node(|n| Box::pin(exec_tty(n))).await
}

/// `ctr task exec -t` in container `id`, on a terminal that `script` gives
/// it: the raw bytes the terminal showed.
fn ctr_exec_tty(n: &Node, id: &str, exec_id: &str, cmd: &str) -> Result<Vec<u8>> {
    let line = format!(
        "ctr --address {} --namespace k8s.io task exec -t --exec-id {exec_id} {id} {cmd}",
        n.c.socket.display()
    );
    // script's input stays open (and empty) until the command ends: at EOF
    // on its input script types the terminal's end-of-file character into
    // the session, and with no terminal of its own to take it from that is
    // a NUL, which the container's terminal would echo as "^@".
    let mut child = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &line, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running script (util-linux)")?;
    // Taken out of `child`, so that waiting does not close it.
    let input = child.stdin.take();
    let out = child.wait_with_output()?;
    drop(input);
    ensure!(
        out.status.success(),
        "{line}: {}",
        veil_tests::containerd::output_text(&out)
    );
    Ok(out.stdout)
}

async fn exec_tty(n: &mut Node) -> Result<Vec<String>> {
    let mut veil_pods = Vec::new();
    let mut seen = Vec::new();
    let mut first_seen = Vec::new();
    for handler in HANDLERS {
        let config = n.pod_config(&format!("tty-{handler}"));
        let pod = n.run_pod(handler, &config).await?;
        if handler == "veil" {
            veil_pods.push(pod.clone());
        }
        // The first process on a terminal (`kubectl run -it`) names its
        // terminal as the container sees it.
        let id = n
            .run(
                &pod,
                &config,
                ContainerConfig {
                    tty: true,
                    stdin: true,
                    ..cri::busybox_container(
                        "sleeper",
                        &["sh", "-c", "tty >/tmp/tty; exec sleep 1000"],
                    )
                },
            )
            .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let first = loop {
            let (out, _, code) = n.exec(&id, "cat /tmp/tty").await?;
            if code == 0 && !out.is_empty() {
                break out;
            }
            ensure!(Instant::now() < deadline, "{handler}: no /tmp/tty");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        first_seen.push(first);
        let shown = ctr_exec_tty(n, &id, "tty1", "tty")?;
        eprintln!("{handler}: {:?}", String::from_utf8_lossy(&shown));
        // No stray byte in what the terminal showed: no NUL, nothing echoed.
        let text = String::from_utf8_lossy(&shown).into_owned();
        ensure!(
            !shown.contains(&0) && !text.contains("^@"),
            "{handler}: a stray byte in the terminal output: {text:?}"
        );
        // The program's line: ctr may add its own complaints after it (a
        // resize of a pty whose process already ended).
        let out = text
            .split(['\r', '\n'])
            .find_map(|l| l.find("/dev/").map(|i| l[i..].to_string()))
            .unwrap_or_default();
        ensure!(
            out.starts_with("/dev/pts/"),
            "{handler}: tty in exec -t printed {text:?}"
        );
        seen.push(out);
        n.remove_pod(&pod).await?;
    }
    ensure!(
        seen[0] == seen[1],
        "the terminal showed something else: runc {:?}, veil {:?}",
        seen[0],
        seen[1]
    );
    ensure!(
        first_seen[0] == first_seen[1] && first_seen[0].starts_with("/dev/pts/"),
        "the first process's tty: runc {:?}, veil {:?}",
        first_seen[0],
        first_seen[1]
    );
    Ok(veil_pods)
}

/// A host directory made a shared mount point (a bind onto itself) for the
/// length of a test, as kubelet's volume directories are on a node; unmounted
/// with everything below it when dropped.
struct SharedDir(std::path::PathBuf);

impl SharedDir {
    fn new(path: std::path::PathBuf) -> Result<Self> {
        use nix::mount::{mount, MsFlags};
        std::fs::create_dir_all(&path)?;
        mount(
            Some(&path),
            &path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("binding {}", path.display()))?;
        let d = SharedDir(path);
        mount(
            None::<&str>,
            &d.0,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .context("making the volume directory shared")?;
        Ok(d)
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_propagation_modes_start_and_private_stays_private() -> Result<()> {
    on_node(|n| Box::pin(propagation(n))).await
}

async fn propagation(n: &mut Node) -> Result<Vec<String>> {
    use k8s_cri::v1::{Mount, MountPropagation};
    // emptyDir volumes reach a veil pod through its scratch disk.
    n.c.configure(&Artefacts::locate()?, &[("veil", "scratch_disk_mib = 32")])?;
    let mut veil_pods = Vec::new();
    let mut seen = Vec::new();
    for handler in HANDLERS {
        let name = format!("prop-{handler}");
        let vol = SharedDir::new(n.work.path().join(format!(
            "kubelet/pods/uid-{name}/volumes/kubernetes.io~empty-dir/vol"
        )))?;
        let mut config = n.pod_config(&name);
        make_privileged(&mut config);
        let pod = n.run_pod(handler, &config).await?;
        if handler == "veil" {
            veil_pods.push(pod.clone());
        }
        let mut ids = Vec::new();
        for (c, prop) in [
            ("bidirectional", MountPropagation::PropagationBidirectional),
            (
                "hosttocontainer",
                MountPropagation::PropagationHostToContainer,
            ),
            ("none", MountPropagation::PropagationPrivate),
        ] {
            let cfg = ContainerConfig {
                mounts: vec![Mount {
                    container_path: "/vol".into(),
                    host_path: vol.0.display().to_string(),
                    propagation: prop as i32,
                    ..Default::default()
                }],
                ..with_security(cri::busybox_container(c, &["sleep", "1000"]), |s| {
                    s.privileged = c == "bidirectional"
                })
            };
            ids.push(n.run(&pod, &config, cfg).await?);
        }
        // The Bidirectional container mounts a tmpfs in the volume after
        // all three started.
        n.exec_ok(
            &ids[0],
            "mkdir -p /vol/sub && mount -t tmpfs t /vol/sub && echo mounted >/vol/sub/f",
        )
        .await?;
        let mut views = Vec::new();
        for id in &ids {
            let (out, _, _) = n
                .exec(id, "cat /vol/sub/f 2>/dev/null || echo absent")
                .await?;
            views.push(out);
        }
        eprintln!("{handler}: {views:?}");
        seen.push(views);
        n.remove_pod(&pod).await?;
        drop(vol);
    }
    ensure!(
        seen[0] == ["mounted\n", "mounted\n", "absent\n"],
        "runc: {:?}",
        seen[0]
    );
    // veil as runc: the Bidirectional container's mount reaches the
    // HostToContainer container through the shared volume, not the private
    // one.
    ensure!(
        seen[1] == seen[0],
        "veil: {:?}, runc: {:?}",
        seen[1],
        seen[0]
    );
    Ok(veil_pods)
}
