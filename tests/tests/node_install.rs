//! veil-node against a private node root and the real Debian containerd:
//! install registers the handlers this machine can run in a config
//! containerd reads, a second install changes nothing, uninstall gives
//! containerd's config back byte for byte and removes what install added;
//! `check` reports this machine's KVM and TEE state with its exit code;
//! an upgrade to a second version while a `veil-sim` pod runs from the
//! installed files leaves that pod running and exec-able (its shim keeps
//! the binary it started from, also across a containerd restart), new pods
//! use the new files, and uninstall still restores containerd's config;
//! the installer image, run by `ctr` as the DaemonSet runs it (privileged,
//! the node's PID namespace, the node's directories mounted under `/host`,
//! the DaemonSet's args), installs into a node containerd that then runs a
//! pod from the installed files, and on SIGTERM uninstalls: containerd's
//! config byte for byte as before, `/opt/veil`, `/etc/veil` and the shim
//! link gone.

use std::{path::Path, process::Command};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{runtime_service_client::RuntimeServiceClient, ContainerState};
use tonic::transport::Channel;
use veil_tests::{
    containerd::{cache_entries, output_text, pod_processes, Containerd},
    node::{image_tree, NodeRoot},
    Artefacts,
};

/// An operator's containerd config: comments, no trailing newline.
const OPERATOR_CONFIG: &str = "version = 2\n# the operator's own settings\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"\n  default_runtime_name = \"runc\"";

/// Whether QEMU `pid` (command line `cmd`) boots `kernel`: named on its
/// command line, or handed over open (`-kernel /dev/fd/N`, the jail's way).
fn boots(pid: u32, cmd: &str, kernel: &str) -> bool {
    if cmd.contains(kernel) {
        return true;
    }
    let mut words = cmd.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-kernel" {
            let Some(fd) = words.next().and_then(|a| a.strip_prefix("/dev/fd/")) else {
                return false;
            };
            return std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .is_ok_and(|p| p.display().to_string() == kernel);
        }
    }
    false
}

#[test]
fn install_twice_then_uninstall_restores_containerd_config() {
    let a = Artefacts::locate().unwrap();
    let node = NodeRoot::new(&a, Some(OPERATOR_CONFIG)).unwrap();
    let out = node
        .veil_node(&["install", "--from", &node.from.display().to_string()])
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("enabled handlers: veil veil-sim\n"), "{text}");
    assert_eq!(node.restarts(), 1);
    for f in [
        "opt/veil/bin/containerd-shim-veil-v2",
        "opt/veil/share/vmlinux",
        "etc/veil/config.toml",
    ] {
        assert!(node.path(f).is_file(), "{f} not installed");
    }
    // The real containerd reads the config and has the two runtimes, run by
    // the installed shim with the installed veil config.
    let cfg = node.path("etc/containerd/config.toml");
    let dump = Command::new("containerd")
        .arg("--config")
        .arg(&cfg)
        .args(["config", "dump"])
        .output()
        .unwrap();
    assert!(dump.status.success(), "{}", output_text(&dump));
    let dump = String::from_utf8_lossy(&dump.stdout);
    let shim = node
        .path("opt/veil/bin/containerd-shim-veil-v2")
        .display()
        .to_string();
    for h in ["veil", "veil-sim"] {
        assert!(
            dump.contains(&format!("runtimes.{h}]")),
            "{h} missing:\n{dump}"
        );
        let cp = format!("{}#{h}", node.path("etc/veil/config.toml").display());
        assert!(dump.contains(&cp), "{cp} missing:\n{dump}");
    }
    assert!(dump.contains(&shim), "runtime_path missing:\n{dump}");
    assert!(
        !dump.contains("veil-snp"),
        "veil-snp enabled on a node without SNP:\n{dump}"
    );
    // The shim reads the installed veil config.
    let v = veil_shim::config::Config::load(&node.path("etc/veil/config.toml")).unwrap();
    assert_eq!(
        v.handlers["veil-sim"].kernel,
        node.path("opt/veil/share/vmlinux")
    );

    // Again: nothing written, containerd not restarted.
    let out = node
        .veil_node(&["install", "--from", &node.from.display().to_string()])
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("wrote"),
        "{}",
        output_text(&out)
    );
    assert_eq!(node.restarts(), 1);

    let out = node.veil_node(&["uninstall"]).unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), OPERATOR_CONFIG);
    assert_eq!(node.restarts(), 2);
    assert!(!node.path("opt/veil").exists());
    assert!(!node.path("etc/veil").exists());
}

#[test]
fn operator_veil_config_kept_and_missing_containerd_config_removed_again() {
    let a = Artefacts::locate().unwrap();
    let node = NodeRoot::new(&a, None).unwrap();
    std::fs::create_dir_all(node.path("etc/veil")).unwrap();
    let mine = "log_level = \"debug\"\n";
    std::fs::write(node.path("etc/veil/config.toml"), mine).unwrap();
    let out = node
        .veil_node(&["install", "--from", &node.from.display().to_string()])
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        std::fs::read_to_string(node.path("etc/veil/config.toml")).unwrap(),
        mine
    );
    let out = node.veil_node(&["uninstall"]).unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(!node.path("etc/containerd/config.toml").exists());
    assert_eq!(
        std::fs::read_to_string(node.path("etc/veil/config.toml")).unwrap(),
        mine
    );
}

#[test]
fn check_reports_this_machine() {
    let a = Artefacts::locate().unwrap();
    let node = NodeRoot::new(&a, None).unwrap();
    let out = node.veil_node(&["check"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let kvm_ok = veil_shim::vmm::accel::kvm_canary(std::time::Duration::from_secs(2)).is_ok();
    if kvm_ok {
        assert!(text.contains("the canary guest ran under KVM"), "{text}");
    } else {
        // This machine: KVM cannot run guests, no TEE, no vhost-vsock.
        assert!(text.contains("fall back to TCG"), "{text}");
        assert_eq!(out.status.code(), Some(11), "{}", output_text(&out));
        let snp = text.lines().find(|l| l.starts_with("veil-snp ")).unwrap();
        assert!(
            snp.contains("KVM usable for guests") && snp.contains("SEV-SNP host support"),
            "{snp}"
        );
        if !std::path::Path::new("/dev/vhost-vsock").exists() {
            assert!(snp.contains("/dev/vhost-vsock"), "{snp}");
        }
    }
    let sim = text.lines().find(|l| l.starts_with("veil-sim ")).unwrap();
    assert!(sim.contains(" yes "), "{sim}");
}

/// The artefacts' second version: the same files but a shim that differs
/// (a marker appended after the ELF's last byte: it runs the same), and
/// another `VERSION`.
const V2_MARKER: &[u8] = b"\0veil-node upgrade test: version 2\0";

/// The inode of what `/proc/PID/exe` runs, and whether that file was
/// replaced or removed since.
fn exe_of(pid: u32) -> Result<(u64, bool)> {
    use std::os::unix::fs::MetadataExt;
    let exe = format!("/proc/{pid}/exe");
    let ino = std::fs::metadata(&exe)
        .with_context(|| format!("stat {exe}"))?
        .ino();
    let link = std::fs::read_link(&exe)?;
    Ok((ino, link.display().to_string().ends_with(" (deleted)")))
}

fn ino(p: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(p)
        .with_context(|| format!("stat {}", p.display()))?
        .ino())
}

/// The one shim process of `c` that serves pod `pod` (its socket address
/// derives from the pod id; the cmdline holds `-id <container>` of the first
/// container, which CRI makes the pod id too).
fn shim_of(c: &Containerd, pod: &str) -> Result<u32> {
    let found: Vec<u32> = c
        .shim_processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(&format!("-id {pod} ")))
        .map(|(pid, _)| pid)
        .collect();
    match found.as_slice() {
        [pid] => Ok(*pid),
        _ => bail!(
            "expected one shim for pod {pod}, found {found:?} among {:?}",
            c.shim_processes()
        ),
    }
}

/// Runs a `veil` pod with a `sleep` container (ExecSync needs no policy;
/// `veil-sim` pods refuse exec unless their policy lists it); the pod and
/// container ids.
async fn sleeper_pod(
    cri: &mut RuntimeServiceClient<Channel>,
    logs: &Path,
    name: &str,
) -> Result<(String, String)> {
    let dir = logs.join(name);
    std::fs::create_dir_all(&dir)?;
    let cfg = veil_tests::cri::pod_config(
        name,
        &format!("uid-{name}"),
        name,
        &dir.display().to_string(),
    );
    let pod = veil_tests::cri::run_pod(cri, "veil", &cfg).await?;
    let id = veil_tests::cri::create_container(
        cri,
        &pod,
        &cfg,
        veil_tests::cri::busybox_container("sleeper", &["sleep", "1000"]),
    )
    .await?;
    veil_tests::cri::start_container(cri, &id).await?;
    Ok((pod, id))
}

/// The container is RUNNING and ExecSync in it answers.
async fn running_and_execs(
    cri: &mut RuntimeServiceClient<Channel>,
    id: &str,
    word: &str,
) -> Result<()> {
    let st = veil_tests::cri::container_status(cri, id).await?;
    ensure!(
        st.state == ContainerState::ContainerRunning as i32,
        "container {id} is not running: {st:?}"
    );
    let (out, err, code) = veil_tests::cri::exec(cri, id, &format!("echo {word}")).await?;
    ensure!(
        (out.as_str(), code) == (format!("{word}\n").as_str(), 0),
        "exec in {id}: stdout {out:?} stderr {err:?} exit {code}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_while_a_pod_runs_keeps_it_and_new_pods_use_the_new_files() -> Result<()> {
    let t0 = std::time::Instant::now();
    let a = Artefacts::locate()?;
    let node = NodeRoot::new(&a, None)?;
    let cfg = node.path("etc/containerd/config.toml");
    // The node's containerd, reading the node's config file (no veil in it).
    let mut c = Containerd::start_node(&a, &cfg, &[node.path("usr/local/bin")])?;
    let before = std::fs::read(&cfg)?;
    std::fs::write(node.from.join("VERSION"), "test-1\n")?;
    let v2 = node.path("image-v2/veil");
    image_tree(&a, &v2)?;
    std::fs::write(v2.join("VERSION"), "test-2\n")?;
    let shim_v2 = v2.join("bin/containerd-shim-veil-v2");
    let mut bytes = std::fs::read(&shim_v2)?;
    bytes.extend_from_slice(V2_MARKER);
    std::fs::write(&shim_v2, &bytes)?;
    let installed_shim = node.path("opt/veil/bin/containerd-shim-veil-v2");

    // Version 1, and containerd restarted as the node's service manager
    // would (the installer's restart command only records that it ran).
    let out = node.veil_node(&["install", "--from", &node.from.display().to_string()])?;
    ensure!(out.status.success(), "{}", output_text(&out));
    ensure!(node.restarts() == 1, "{}", output_text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("artefacts test-1\n"),
        "{}",
        output_text(&out)
    );
    c.restart()?;
    let after_v1 = std::fs::read_to_string(&cfg)?;

    let work = tempfile::tempdir()?;
    veil_tests::cri::import_pod_images(&c, work.path())?;
    let mut cri = veil_tests::cri::client(&c).await?;
    let (pod1, ctr1) = sleeper_pod(&mut cri, work.path(), "before-upgrade").await?;
    running_and_execs(&mut cri, &ctr1, "v1").await?;
    // The pod runs from the installed files only.
    let shim1 = shim_of(&c, &pod1)?;
    let (shim1_ino, replaced) = exe_of(shim1)?;
    ensure!(
        shim1_ino == ino(&installed_shim)? && !replaced,
        "pod 1's shim does not run the installed shim"
    );
    let vmm1 = pod_processes(&pod1);
    let kernel = node.path("opt/veil/share/vmlinux").display().to_string();
    ensure!(
        vmm1.iter()
            .any(|(pid, cmd)| cmd.contains("qemu") && boots(*pid, cmd, &kernel)),
        "no QEMU of pod 1 booting the installed kernel: {vmm1:?}"
    );

    // Version 2 while the pod runs.
    let out = node.veil_node(&["install", "--from", &v2.display().to_string()])?;
    ensure!(out.status.success(), "{}", output_text(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("upgraded artefacts test-1 -> test-2\n"),
        "{text}"
    );
    ensure!(
        text.contains(&format!("wrote {}\n", installed_shim.display())),
        "{text}"
    );
    // The installed tree is version 2.
    ensure!(
        std::fs::read(&installed_shim)? == bytes,
        "installed shim is not v2"
    );
    ensure!(std::fs::read_to_string(node.path("opt/veil/VERSION"))? == "test-2\n");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node.path("opt/veil/install.json"))?)?;
    ensure!(record["artefacts"] == "test-2", "record: {record}");
    // containerd's config: the same single block, so no restart.
    let after_v2 = std::fs::read_to_string(&cfg)?;
    ensure!(
        after_v2 == after_v1,
        "the upgrade changed containerd's config:\n{after_v2}"
    );
    ensure!(
        after_v2.matches("# >>> veil:").count() == 1 && after_v2.as_bytes().starts_with(&before),
        "containerd's config is not the operator's plus one block:\n{after_v2}"
    );
    ensure!(node.restarts() == 1, "containerd restarted by the upgrade");

    // The running pod: its shim still runs the old file (renamed away, inode
    // kept), its QEMU and backend are the same processes, it serves.
    let (ino_now, replaced) = exe_of(shim1)?;
    ensure!(
        ino_now == shim1_ino && replaced && ino_now != ino(&installed_shim)?,
        "pod 1's shim lost its binary: inode {ino_now} (was {shim1_ino}), replaced {replaced}"
    );
    ensure!(
        pod_processes(&pod1) == vmm1,
        "pod 1's host processes changed"
    );
    running_and_execs(&mut cri, &ctr1, "after-upgrade").await?;

    // An upgrade whose config block changed restarts containerd: the pod
    // survives that too (the new containerd reconnects to the old shim).
    c.restart()?;
    let mut cri = veil_tests::cri::client(&c).await?;
    running_and_execs(&mut cri, &ctr1, "after-restart").await?;
    ensure!(shim_of(&c, &pod1)? == shim1, "pod 1's shim was replaced");

    // A new pod runs the new shim.
    let (pod2, ctr2) = sleeper_pod(&mut cri, work.path(), "after-upgrade").await?;
    running_and_execs(&mut cri, &ctr2, "v2").await?;
    let (shim2_ino, replaced) = exe_of(shim_of(&c, &pod2)?)?;
    ensure!(
        shim2_ino == ino(&installed_shim)? && !replaced,
        "pod 2 does not run the installed v2 shim"
    );
    ensure!(!pod_processes(&pod2).is_empty(), "pod 2 has no VM");

    for pod in [&pod1, &pod2] {
        veil_tests::cri::remove_pod(&mut cri, pod).await?;
    }
    c.wait_clean(&[pod1.as_str(), pod2.as_str()])?;
    let images = cache_entries(&node.path("var/lib/veil/images"));
    ensure!(images.is_empty(), "image cache left: {images:?}");

    let out = node.veil_node(&["uninstall"])?;
    ensure!(out.status.success(), "{}", output_text(&out));
    ensure!(node.restarts() == 2);
    ensure!(
        std::fs::read(&cfg)? == before,
        "containerd's config not restored byte for byte"
    );
    ensure!(!node.path("opt/veil").exists() && !node.path("etc/veil").exists());
    c.restart()?;
    eprintln!("upgrade test took {:.1?}", t0.elapsed());
    Ok(())
}

/// The installer container's namespace and id in the test's containerd.
const INSTALLER_NS: &str = "veil-installer";
const INSTALLER_ID: &str = "veil-node";

/// The host paths the DaemonSet mounts (deploy/kubernetes/daemonset.yaml),
/// where it mounts them, whether read-only, and whether the path may be
/// created (`DirectoryOrCreate`, or no type) or must exist (`Directory`).
const DAEMONSET_MOUNTS: &[(&str, &str, bool)] = &[
    ("opt/veil", "/host/opt/veil", false),
    ("etc/containerd", "/host/etc/containerd", false),
    ("etc/veil", "/host/etc/veil", false),
    ("var/lib", "/host/var/lib", false),
    ("run/systemd", "/host/run/systemd", false),
    ("run/veil", "/host/run/veil", false),
    ("usr", "/host/usr", true),
    ("usr/local/bin", "/host/usr/local/bin", false),
];

/// The DaemonSet container's args.
const DAEMONSET_ARGS: &[&str] = &[
    "run",
    "--root",
    "/host",
    "--host-mount-ns",
    "--from",
    "/veil",
    "--metrics-listen",
    "0.0.0.0:9464",
    "--state-dir",
    "/run/veil",
];

/// The node's PID namespace: a new one whose PID 1 (`sleep`) lives in the
/// node's (the test's) mount namespace, as a node's init does. This
/// machine's own PID 1 does not let anyone open its namespaces, so the
/// installer's `--host-mount-ns` (`/proc/1/ns/mnt`) could not work in the
/// test's PID namespace. Dropping it kills that init by PID, which kills
/// everything left in the namespace.
struct NodePidNs {
    unshare: std::process::Child,
    init: u32,
}

impl NodePidNs {
    fn start() -> Result<Self> {
        let mut unshare = Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", "sleep", "100000"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("starting unshare --pid")?;
        let children = format!("/proc/{0}/task/{0}/children", unshare.id());
        for _ in 0..100 {
            let text = std::fs::read_to_string(&children).unwrap_or_default();
            if let Some(init) = text.split_whitespace().next() {
                let init: u32 = init.parse().context("child pid of unshare")?;
                return Ok(NodePidNs { unshare, init });
            }
            if let Some(st) = unshare.try_wait()? {
                bail!("unshare --pid exited ({st})");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = unshare.kill();
        let _ = unshare.wait();
        bail!("unshare --pid started no child in 2 s")
    }

    fn ns(&self) -> String {
        format!("/proc/{}/ns/pid", self.init)
    }
}

impl Drop for NodePidNs {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.init as i32),
            nix::sys::signal::SIGKILL,
        );
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// Removes the installer container (SIGKILL, task and container deleted)
/// when dropped, also while a failing test unwinds; before the containerd
/// it runs in is stopped.
struct InstallerContainer {
    socket: std::path::PathBuf,
}

impl InstallerContainer {
    fn ctr(&self, args: &[&str]) -> Option<std::process::Output> {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", INSTALLER_NS])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .ok()
    }
}

impl Drop for InstallerContainer {
    fn drop(&mut self) {
        let _ = self.ctr(&["task", "kill", "-s", "KILL", INSTALLER_ID]);
        for _ in 0..100 {
            match self.ctr(&["task", "delete", INSTALLER_ID]) {
                Some(o) if o.status.success() => break,
                Some(o) if String::from_utf8_lossy(&o.stderr).contains("not found") => break,
                _ => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
        let _ = self.ctr(&["containers", "delete", INSTALLER_ID]);
    }
}

/// The installer's `--restart-cmd`: run by `sh` in the node's mount
/// namespace, it asks the node's service manager (this test: [`serve`])
/// to restart containerd by creating a request file and waits until that
/// is gone (up to 120 s).
fn restart_request_cmd(dir: &Path) -> String {
    format!(
        "r={}/restart-request.$$; : > \"$r\"; i=0; while [ -e \"$r\" ]; do i=$((i+1)); \
         if [ $i -gt 1200 ]; then echo \"nobody restarted containerd in 120 s ($r)\" >&2; exit 1; fi; \
         sleep 0.1; done",
        dir.display()
    )
}

/// Acts as the node's service manager until `done` says so (or `secs`
/// pass): each restart request of the installer restarts `c` (the installer
/// container's shim keeps running; the new containerd reconnects to it)
/// and is answered by removing the request. Counts the restarts in
/// `restarts`.
fn serve(
    c: &mut Containerd,
    dir: &Path,
    restarts: &mut usize,
    secs: u64,
    what: &str,
    mut done: impl FnMut(&Containerd) -> Result<bool>,
) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        for e in std::fs::read_dir(dir)?.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with("restart-request.")
            {
                c.restart()?;
                *restarts += 1;
                std::fs::remove_file(e.path())?;
            }
        }
        if done(c)? {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("{what}: not done in {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installer_image_run_by_ctr_as_the_daemonset_installs_and_uninstalls_on_sigterm(
) -> Result<()> {
    let t0 = std::time::Instant::now();
    let a = Artefacts::locate()?;
    // The DaemonSet as this test mirrors it.
    let yaml = std::fs::read_to_string(
        veil_tests::workspace_root().join("deploy/kubernetes/daemonset.yaml"),
    )?;
    let args_line = format!(
        "args: [{}",
        DAEMONSET_ARGS
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    ) + "]";
    ensure!(
        yaml.replace("\n                 ", " ")
            .contains(&args_line),
        "daemonset.yaml's args are not {DAEMONSET_ARGS:?}"
    );
    for (host, at, _) in DAEMONSET_MOUNTS {
        ensure!(
            yaml.contains(&format!("mountPath: {at}\n"))
                && yaml.contains(&format!("path: /{host}\n")),
            "daemonset.yaml does not mount /{host} at {at}"
        );
    }
    ensure!(yaml.contains("hostPID: true") && yaml.contains("privileged: true"));

    // The image, built offline as a release would.
    let work = tempfile::tempdir()?;
    let tar = work.path().join("installer.tar");
    let image = "veil.test/veil-node:ctr-test";
    veil_tests::node::veil_node_bin()?;
    let out = Command::new("bash")
        .arg(veil_tests::workspace_root().join("deploy/installer/build-image.sh"))
        .arg(&tar)
        .arg(image)
        .output()?;
    ensure!(
        out.status.success(),
        "build-image.sh: {}",
        output_text(&out)
    );
    eprintln!("image built after {:.1?}", t0.elapsed());

    let node = NodeRoot::new(&a, None)?;
    // The node's QEMU as a file of its own (the fixture's symlink points
    // at a path outside the node root, which the container cannot see).
    let qemu = node.path("usr/bin/qemu-system-x86_64");
    std::fs::remove_file(&qemu)?;
    if std::fs::hard_link(&a.qemu, &qemu).is_err() {
        std::fs::copy(&a.qemu, &qemu)?;
    }
    // QEMU finds its modules and firmware relative to its own path.
    for d in [
        "usr/lib/x86_64-linux-gnu/qemu",
        "usr/share/qemu",
        "usr/share/seabios",
    ] {
        let here = Path::new("/").join(d);
        if here.is_dir() {
            std::fs::create_dir_all(node.path(d).parent().context("no parent")?)?;
            std::os::unix::fs::symlink(&here, node.path(d))?;
        }
    }
    for (host, _, _) in DAEMONSET_MOUNTS {
        std::fs::create_dir_all(node.path(host))?;
    }
    let cfg = node.path("etc/containerd/config.toml");
    let mut c = Containerd::start_node(&a, &cfg, &[node.path("usr/local/bin")])?;
    let before = std::fs::read(&cfg)?;
    c.import(INSTALLER_NS, &tar)?;
    let pidns = NodePidNs::start()?;
    let svc = tempfile::tempdir()?;
    let log = svc.path().join("installer.log");
    let root = node.dir.path().display().to_string();

    let mut run: Vec<String> = [
        "run",
        "-d",
        "--privileged",
        "--with-ns",
        &format!("pid:{}", pidns.ns()),
        "--log-uri",
        &format!("file://{}", log.display()),
        "--env",
        "NODE_NAME=veil-test-node",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (host, at, ro) in DAEMONSET_MOUNTS {
        run.push("--mount".into());
        run.push(format!(
            "type=bind,src={},dst={at},options=rbind:{}",
            node.path(host).display(),
            if *ro { "ro" } else { "rw" }
        ));
    }
    run.extend([image.to_string(), INSTALLER_ID.to_string()]);
    run.push("/usr/bin/veil-node".into());
    run.extend(DAEMONSET_ARGS.iter().map(|s| s.to_string()));
    // A private node root, not the machine's `/`; no systemd: containerd is
    // restarted through the test.
    run.extend([
        "--root-in-host".to_string(),
        root.clone(),
        "--restart-cmd".to_string(),
        restart_request_cmd(svc.path()),
    ]);
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    c.ctr_ok(INSTALLER_NS, &run)?;
    let _installer = InstallerContainer {
        socket: c.socket.clone(),
    };
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    let mut restarts = 0;
    serve(&mut c, svc.path(), &mut restarts, 120, "install", |c| {
        let text = log_text();
        if text.contains("installed; waiting for SIGTERM to uninstall\n") {
            return Ok(true);
        }
        let st = c.task_status(INSTALLER_NS, INSTALLER_ID)?;
        ensure!(st == "RUNNING", "installer task {st:?}; log:\n{text}");
        Ok(false)
    })
    .with_context(log_text)?;
    let text = log_text();
    eprintln!("installed after {:.1?}:\n{text}", t0.elapsed());
    ensure!(restarts == 1, "{restarts} containerd restarts for install");
    ensure!(
        text.contains("enabled handlers: veil veil-sim\n")
            && text.contains("artefacts ctr-test\n")
            && text.contains("serving metrics on 0.0.0.0:9464\n"),
        "{text}"
    );
    let installed_shim = node.path("opt/veil/bin/containerd-shim-veil-v2");
    ensure!(
        std::fs::read_link(node.path("usr/local/bin/containerd-shim-veil-v2"))? == installed_shim
    );

    // A CRI pod from the installed files only.
    let mut cri = veil_tests::cri::client(&c).await?;
    veil_tests::cri::import_pod_images(&c, work.path())?;
    let (pod, ctr) = sleeper_pod(&mut cri, work.path(), "from-installer").await?;
    running_and_execs(&mut cri, &ctr, "installed").await?;
    let (shim_ino, replaced) = exe_of(shim_of(&c, &pod)?)?;
    ensure!(
        shim_ino == ino(&installed_shim)? && !replaced,
        "the pod's shim is not the installed one"
    );
    let kernel = node.path("opt/veil/share/vmlinux").display().to_string();
    let vmm = pod_processes(&pod);
    ensure!(
        vmm.iter().any(
            |(pid, cmd)| cmd.contains(&qemu.display().to_string()) && boots(*pid, cmd, &kernel)
        ),
        "no QEMU of the node booting the installed kernel: {vmm:?}"
    );
    veil_tests::cri::remove_pod(&mut cri, &pod).await?;
    drop(cri);
    // What the pod left (the installer's own shim still runs, as it should).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left: Vec<String> = c
            .leftovers(&[pod.as_str()])
            .into_iter()
            .filter(|l| !l.contains(&format!("-namespace {INSTALLER_NS} ")))
            .collect();
        if left.is_empty() {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "left behind by the pod:\n{}",
            left.join("\n")
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!("pod ran and was removed after {:.1?}", t0.elapsed());

    // The DaemonSet deleted: SIGTERM to the installer.
    c.ctr_ok(INSTALLER_NS, &["task", "kill", "-s", "TERM", INSTALLER_ID])?;
    serve(&mut c, svc.path(), &mut restarts, 120, "uninstall", |c| {
        Ok(c.task_status(INSTALLER_NS, INSTALLER_ID)? == "STOPPED")
    })
    .with_context(log_text)?;
    let text = log_text();
    eprintln!("uninstalled after {:.1?}:\n{text}", t0.elapsed());
    ensure!(restarts == 2, "{restarts} containerd restarts in all");
    ensure!(
        text.contains("SIGTERM: uninstalling\n") && !text.contains("veil-node: "),
        "{text}"
    );
    ensure!(
        std::fs::read(&cfg)? == before,
        "containerd's config not restored byte for byte"
    );
    ensure!(!node.path("opt/veil").exists(), "/opt/veil left");
    ensure!(!node.path("etc/veil").exists(), "/etc/veil left");
    ensure!(
        node.path("usr/local/bin/containerd-shim-veil-v2")
            .symlink_metadata()
            .is_err(),
        "the shim link left"
    );
    c.kill_and_remove(INSTALLER_NS, INSTALLER_ID)?;
    c.ctr_ok(INSTALLER_NS, &["images", "remove", image])?;

    // Nothing left: no installer process, no mount of the node root or of
    // the installer's rootfs, no shim.
    let left: Vec<(u32, String)> = veil_tests::containerd::processes()
        .into_iter()
        .filter(|(pid, cmd)| {
            ![pidns.init, c.pid()].contains(pid)
                && (cmd.contains(&root) || cmd.contains("/usr/bin/veil-node"))
        })
        .collect();
    ensure!(left.is_empty(), "processes left: {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let rootfs = c
        .dir()
        .join(format!(
            "state/io.containerd.runtime.v2.task/{INSTALLER_NS}"
        ))
        .display()
        .to_string();
    let m: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&root) || l.contains(&rootfs))
        .collect();
    ensure!(m.is_empty(), "mounts left: {m:?}");
    ensure!(c.shim_processes().is_empty(), "{:?}", c.shim_processes());
    eprintln!("installer test took {:.1?}", t0.elapsed());
    Ok(())
}
