//! A private containerd for end-to-end tests: its own root, state, sockets and
//! config (CRI plugin with the overlayfs snapshotter, the `veil` and
//! `veil-sim` handlers mapped to `io.containerd.veil.v2`, `runc` for
//! baselines, a pause image built offline, a pod network that stays inside
//! each pod's network namespace), started by the test and stopped by PID.
//!
//! [`Containerd`] owns it all: dropping it (also while a failing test
//! unwinds) stops containerd, then the shims it started (found by their
//! `-address` argument, killed by PID), cleans the pod directories those shims
//! left under the veil state dir (whose recorded VMM and vsock-backend PIDs are
//! checked against their start times), unmounts what is left below its root
//! and removes it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::Artefacts;

/// Where the shim keeps pod directories (the default `state_dir`).
pub const VEIL_STATE_DIR: &str = "/run/veil";

/// How to start the private containerd.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Run containerd (and so the CNI plugins and the shims) in this
    /// network namespace (a path such as `/run/netns/NAME`), not the node's.
    pub netns: Option<PathBuf>,
    /// A CNI conflist to use instead of the test's pod-local one; Debian's
    /// `bridge`, `host-local`, `loopback` and `portmap` plugins are on its
    /// plugin path. `@DIR@` in it is replaced with the private directory.
    pub cni_conflist: Option<String>,
}

/// How the private containerd is (re)started.
struct Launch {
    bin: PathBuf,
    netns: Option<PathBuf>,
    config: PathBuf,
    path: String,
}

/// A running private containerd.
pub struct Containerd {
    child: Child,
    launch: Launch,
    /// containerd's gRPC socket.
    pub socket: PathBuf,
    /// The veil config the handlers use (`ConfigPath`, without `#handler`).
    pub veil_config: PathBuf,
    /// Image cache of the shims started by this containerd.
    pub image_dir: PathBuf,
    /// The veil config's `scratch_dir` (pods' scratch disks).
    pub scratch_dir: PathBuf,
    /// containerd's stdout/stderr (shim logs included).
    pub log: PathBuf,
    pods_before: Vec<String>,
    dir: tempfile::TempDir,
}

/// Debian's CNI plugins (`containernetworking-plugins`).
const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";

/// The CNI setup of the private containerd: every pod gets a network
/// namespace of its own with an `eth0` holding a test address (one end of a
/// veth pair whose other end stays in the pod too;
/// `support/cni-dummy.sh`: CRI requires a pod IP) and `lo` (Debian's
/// `loopback` plugin). Nothing reaches outside the pod and the node's
/// network is not touched.
fn install_cni(dir: &Path, conflist: Option<&str>) -> Result<()> {
    let bin = dir.join("cni/bin");
    let conf = dir.join("cni/conf");
    fs::create_dir_all(&bin)?;
    fs::create_dir_all(&conf)?;
    for plugin in ["loopback", "bridge", "host-local", "portmap"] {
        let p = Path::new(CNI_PLUGIN_DIR).join(plugin);
        if !p.is_file() {
            bail!(
                "CNI {plugin} plugin {} not found: run ci/setup.sh (containernetworking-plugins)",
                p.display()
            );
        }
        std::os::unix::fs::symlink(&p, bin.join(plugin))?;
    }
    if let Some(list) = conflist {
        fs::write(
            conf.join("10-veil-test.conflist"),
            list.replace("@DIR@", &dir.display().to_string()),
        )?;
        return Ok(());
    }
    std::os::unix::fs::symlink(
        crate::workspace_root().join("tests/support/cni-dummy.sh"),
        bin.join("veil-test-dummy"),
    )?;
    fs::write(
        conf.join("10-veil-test.conflist"),
        r#"{"cniVersion": "0.4.0", "name": "veil-test", "plugins": [{"type": "veil-test-dummy"}, {"type": "loopback"}]}"#,
    )?;
    Ok(())
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// The scratch dir next to `image_dir` (both in the harness's temp dir).
fn scratch_dir_of(image_dir: &Path) -> PathBuf {
    image_dir.with_file_name("veil-scratch")
}

/// Where the harness keeps copies of the tools that pods' jailed processes
/// execute (next to `image_dir`): the originals may sit below a directory
/// other users cannot search (`~/.cache`).
fn jail_tools_of(image_dir: &Path) -> PathBuf {
    image_dir.with_file_name("bin")
}

/// `tool` as a jailed pod process can execute it: the harness's copy if it
/// made one, else itself.
fn jail_tool(image_dir: &Path, tool: &Path) -> PathBuf {
    let copy = tool.file_name().map(|n| jail_tools_of(image_dir).join(n));
    match copy {
        Some(c) if c.is_file() => c,
        _ => tool.to_path_buf(),
    }
}

/// Makes the harness's directory reachable by pods' jailed processes
/// (search only: `o+x`) and copies the vsock backend where they can execute
/// it. The kernel and initrd need no copy: QEMU gets them open.
pub fn prepare_for_jail(a: &Artefacts, dir: &Path, image_dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o711))?;
    let bin = jail_tools_of(image_dir);
    fs::create_dir_all(&bin)?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
    let name = a
        .vhost_device_vsock
        .file_name()
        .context("vhost-device-vsock path has no file name")?;
    fs::copy(&a.vhost_device_vsock, bin.join(name))
        .with_context(|| format!("copying {}", a.vhost_device_vsock.display()))?;
    Ok(())
}

/// The veil config for tests: the built kernel, initrd and tools.
pub fn veil_config(a: &Artefacts, image_dir: &Path) -> String {
    veil_config_with(a, image_dir, &[])
}

/// The veil config with `extra` TOML lines (handler, lines) added to the
/// `veil` and `veil-sim` handler sections (e.g. a broker, a scratch disk).
pub fn veil_config_with(a: &Artefacts, image_dir: &Path, extra: &[(&str, &str)]) -> String {
    let handler = |name: &str, tee: &str| {
        let more: String = extra
            .iter()
            .filter(|(h, _)| *h == name)
            .map(|(_, l)| format!("{}\n", l.trim_end()))
            .collect();
        format!(
            "[handlers.{name}]\ntee = \"{tee}\"\nkernel = {}\ninitrd = {}\nkernel_params = {:?}\n{more}",
            toml_str(&a.kernel),
            toml_str(&a.initrd),
            std::env::var("VEIL_TEST_CMDLINE").unwrap_or_default(),
        )
    };
    format!(
        "state_dir = \"{VEIL_STATE_DIR}\"\nimage_dir = {}\nscratch_dir = {}\nqemu = {}\nvhost_device_vsock = {}\nvirtiofsd = {}\n\n{}\n{}",
        toml_str(image_dir),
        toml_str(&scratch_dir_of(image_dir)),
        toml_str(&a.qemu),
        toml_str(&jail_tool(image_dir, &a.vhost_device_vsock)),
        toml_str(&a.virtiofsd),
        handler("veil", "none"),
        handler("veil-sim", "sim"),
    )
}

fn containerd_config(dir: &Path, veil_config: &Path, veil_runtimes: bool) -> String {
    let d = |s: &str| toml_str(&dir.join(s));
    let runtime = |name: &str| {
        format!(
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{name}]\n  runtime_type = \"io.containerd.veil.v2\"\n  pod_annotations = [\"io.veil.*\"]\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{name}.options]\n    ConfigPath = \"{}#{name}\"\n",
            veil_config.display()
        )
    };
    format!(
        r#"version = 2
root = {root}
state = {state}
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = {sock}

[ttrpc]
  address = {ttrpc}

[debug]
  address = {debug}

[plugins."io.containerd.internal.v1.opt"]
  path = {opt}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # Pods get no lower OOM score than containerd's own: where the tests run,
  # lowering it may be denied even to root (runc then cannot start a pod).
  restrict_oom_score_adj = true
  # Pod network namespaces below this containerd's own state dir, so a test
  # cleans up its own and never another's running at the same time.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
{veil}
{veil_sim}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {cni_bin}
    conf_dir = {cni_conf}
"#,
        root = d("root"),
        state = d("state"),
        sock = d("containerd.sock"),
        ttrpc = d("containerd.sock.ttrpc"),
        debug = d("debug.sock"),
        opt = d("opt"),
        pause = crate::oci::PAUSE_IMAGE,
        veil = if veil_runtimes {
            runtime("veil")
        } else {
            String::new()
        },
        veil_sim = if veil_runtimes {
            runtime("veil-sim")
        } else {
            String::new()
        },
        cni_bin = d("cni/bin"),
        cni_conf = d("cni/conf"),
    )
}

fn list_pods() -> Vec<String> {
    fs::read_dir(VEIL_STATE_DIR)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The jail uid leases under the veil state dir: (uid, pod).
pub fn jail_leases() -> Vec<(u32, String)> {
    let dir = veil_shim::jail::leases_dir(Path::new(VEIL_STATE_DIR));
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let uid = e.file_name().to_str()?.parse().ok()?;
            let pod = fs::read_link(e.path()).ok()?;
            Some((uid, pod.to_str()?.to_string()))
        })
        .collect()
}

/// Command lines of every process, by PID.
pub fn processes() -> Vec<(u32, String)> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let raw = fs::read(e.path().join("cmdline")).ok()?;
            if raw.is_empty() || !crate::vm::pid_alive(pid) {
                return None;
            }
            Some((pid, String::from_utf8_lossy(&raw).replace('\0', " ")))
        })
        .collect()
}

/// The host processes of pod `pod` (QEMU, vhost-device-vsock, virtiofsd):
/// their command lines name its directory under the veil state dir.
pub fn pod_processes(pod: &str) -> Vec<(u32, String)> {
    let dir = format!("{VEIL_STATE_DIR}/{pod}/");
    processes()
        .into_iter()
        .filter(|(_, c)| c.contains(&dir))
        .collect()
}

/// What pods left in an image cache directory: their references
/// (`<key>.refs/<pod>`) and temporary files of builds. Images no pod holds
/// are not leftovers: the cache keeps them within its bound
/// (`image_cache_mib`).
pub fn cache_entries(dir: &Path) -> Vec<String> {
    let mut left = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") {
            left.push(name);
        } else if name.ends_with(".refs") {
            for r in fs::read_dir(e.path()).into_iter().flatten().flatten() {
                left.push(format!("{name}/{}", r.file_name().to_string_lossy()));
            }
        }
    }
    left
}

impl Containerd {
    /// Starts containerd with a fresh root and state, the shim from the
    /// artefacts on its PATH, and waits for it to answer.
    pub fn start(a: &Artefacts) -> Result<Self> {
        Self::start_with(a, &Options::default())
    }

    /// [`Self::start`] with `opts`.
    pub fn start_with(a: &Artefacts, opts: &Options) -> Result<Self> {
        Self::start_inner(a, opts, None)
    }

    /// A containerd whose config is the file `config_file` (a node's
    /// `/etc/containerd/config.toml`), written without the veil runtimes,
    /// with the artefacts' shim off its PATH: whoever registers the runtimes
    /// in that file (`veil-node install`) decides which shim runs.
    /// [`Self::restart`] makes it read the file again.
    /// `path` is the node's PATH for containerd (where containerd 1.6 looks
    /// the shim up), before the system's.
    pub fn start_node(a: &Artefacts, config_file: &Path, path: &[PathBuf]) -> Result<Self> {
        Self::start_inner(a, &Options::default(), Some((config_file, path)))
    }

    fn start_inner(
        a: &Artefacts,
        opts: &Options,
        node: Option<(&Path, &[PathBuf])>,
    ) -> Result<Self> {
        let config_file = node.map(|(f, _)| f);
        if !nix::unistd::Uid::effective().is_root() {
            bail!("containerd tests need root");
        }
        let bin = which("containerd").context("containerd not found: run ci/setup.sh")?;
        which("ctr").context("ctr not found: run ci/setup.sh")?;
        let dir = tempfile::Builder::new()
            .prefix("veil-containerd.")
            .tempdir()?;
        let image_dir = dir.path().join("veil-images");
        let veil_config = dir.path().join("veil.toml");
        prepare_for_jail(a, dir.path(), &image_dir)?;
        fs::write(&veil_config, veil_config_text(a, &image_dir))?;
        let config = match config_file {
            Some(f) => f.to_path_buf(),
            None => dir.path().join("config.toml"),
        };
        if let Some(parent) = config.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(
            &config,
            containerd_config(dir.path(), &veil_config, config_file.is_none()),
        )?;
        install_cni(dir.path(), opts.cni_conflist.as_deref())?;
        let log = dir.path().join("containerd.log");
        let system_path =
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        let path = if let Some((_, dirs)) = node {
            let mut p: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            p.push(system_path);
            p.join(":")
        } else {
            let shim_dir = a
                .require_shim()?
                .parent()
                .context("shim path has no parent")?
                .to_path_buf();
            format!("{}:{system_path}", shim_dir.display())
        };
        let pods_before = list_pods();
        let launch = Launch {
            bin,
            netns: opts.netns.clone(),
            config,
            path,
        };
        let child = spawn(&launch, &log)?;
        let mut c = Containerd {
            child,
            launch,
            socket: dir.path().join("containerd.sock"),
            veil_config,
            scratch_dir: scratch_dir_of(&image_dir),
            image_dir,
            log,
            pods_before,
            dir,
        };
        c.wait_ready()?;
        Ok(c)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.socket.exists()
                && self
                    .ctr("default")
                    .arg("version")
                    .output()?
                    .status
                    .success()
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("containerd exited ({status}); log:\n{}", self.log_text());
            }
            if Instant::now() > deadline {
                bail!("containerd did not start; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Restarts containerd as a node's service manager would (SIGTERM, wait,
    /// start again with the same config file, now re-read); its shims keep
    /// running and the new containerd reconnects to them.
    pub fn restart(&mut self) -> Result<()> {
        self.stop_child();
        self.child = spawn(&self.launch, &self.log)?;
        self.wait_ready()
    }

    /// Kills containerd with SIGKILL (a crash: nothing shut down), then
    /// starts it again as a service manager would; the shims keep running.
    pub fn kill_and_restart(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.launch, &self.log)?;
        self.wait_ready()
    }

    /// containerd's config file.
    pub fn config_file(&self) -> &Path {
        &self.launch.config
    }

    /// containerd's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The private directory (root, state, configs, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `ctr` against this containerd in `namespace`.
    pub fn ctr(&self, namespace: &str) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(namespace)
            .stdin(Stdio::null());
        c
    }

    /// `ctr run` with the veil runtime and the handler config `rt` (see
    /// [`Self::runtime_config`]); the caller adds options, image, id, args.
    pub fn ctr_run(&self, namespace: &str, rt: &str) -> Command {
        let mut c = self.ctr(namespace);
        c.args([
            "run",
            "--runtime",
            "io.containerd.veil.v2",
            "--runtime-config-path",
            rt,
        ]);
        c
    }

    /// SIGKILLs container `id`'s task, deletes the task once it has exited
    /// (up to 30 s), then deletes the container, failing with ctr's output
    /// if that does not succeed (leftovers are for [`Self::wait_clean`]).
    pub fn kill_and_remove(&self, namespace: &str, id: &str) -> Result<()> {
        let _ = self
            .ctr(namespace)
            .args(["task", "kill", "-s", "KILL", id])
            .output();
        for _ in 0..300 {
            match self.ctr(namespace).args(["task", "delete", id]).output() {
                Ok(o) if o.status.success() => break,
                Ok(o) if String::from_utf8_lossy(&o.stderr).contains("not found") => break,
                _ => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
        self.ctr_ok(namespace, &["containers", "delete", id])?;
        Ok(())
    }

    /// Runs `ctr` and fails with its output unless it succeeds.
    pub fn ctr_ok(&self, namespace: &str, args: &[&str]) -> Result<Output> {
        let out = self.ctr(namespace).args(args).output()?;
        if !out.status.success() {
            bail!(
                "ctr {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// The status `ctr task ls` shows for task `id` in `namespace` ("" if
    /// there is no such task).
    pub fn task_status(&self, namespace: &str, id: &str) -> Result<String> {
        let out = self.ctr_ok(namespace, &["task", "ls"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("")
            .to_string())
    }

    /// Imports an OCI archive into `namespace`.
    pub fn import(&self, namespace: &str, archive: &Path) -> Result<()> {
        let a = archive.display().to_string();
        self.ctr_ok(namespace, &["images", "import", &a])?;
        Ok(())
    }

    /// Rewrites the veil config with `extra` lines in the handler sections
    /// (see [`veil_config_with`]); each new pod's shim reads it.
    pub fn configure(&self, a: &Artefacts, extra: &[(&str, &str)]) -> Result<()> {
        fs::write(
            &self.veil_config,
            veil_config_with(a, &self.image_dir, extra),
        )?;
        Ok(())
    }

    /// The veil config as the shims read it.
    pub fn veil_settings(&self) -> Result<veil_shim::config::Config> {
        Ok(veil_shim::config::Config::load(&self.veil_config)?)
    }

    /// The `--runtime-config-path` value for `handler`.
    pub fn runtime_config(&self, handler: &str) -> String {
        format!("{}#{handler}", self.veil_config.display())
    }

    /// Shims started by this containerd that are still running.
    pub fn shim_processes(&self) -> Vec<(u32, String)> {
        let sock = self.socket.display().to_string();
        processes()
            .into_iter()
            .filter(|(_, c)| c.contains("containerd-shim") && c.contains(&sock))
            .collect()
    }

    /// Pod directories that appeared under the veil state dir since start
    /// and belong to this containerd: a task of that id has (or had, until
    /// containerd stopped) a bundle in its state dir. Other tests' pods, of
    /// other containerds running at the same time, are not ours.
    pub fn new_pod_dirs(&self) -> Vec<String> {
        let tasks = self.dir.path().join("state/io.containerd.runtime.v2.task");
        let ours: Vec<String> = fs::read_dir(&tasks)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|ns| fs::read_dir(ns.path()).ok())
            .flat_map(|ids| ids.flatten())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        list_pods()
            .into_iter()
            .filter(|p| !self.pods_before.contains(p) && ours.contains(p))
            .collect()
    }

    /// What is left of the pods `pods`: processes whose command line names
    /// their state dir (QEMU, vhost-device-vsock), shims of this containerd,
    /// the pod directories, mounts below them, their scratch disks, image
    /// references and build temporaries in the image cache (cached images
    /// no pod holds are not leftovers).
    /// Empty when everything was cleaned up.
    pub fn leftovers(&self, pods: &[&str]) -> Vec<String> {
        let mut left: Vec<String> = self
            .shim_processes()
            .into_iter()
            .map(|(pid, c)| format!("shim process {pid}: {c}"))
            .collect();
        for pod in pods {
            left.extend(
                pod_processes(pod)
                    .into_iter()
                    .map(|(pid, c)| format!("process {pid}: {c}")),
            );
            if Path::new(VEIL_STATE_DIR).join(pod).exists() {
                left.push(format!("{VEIL_STATE_DIR}/{pod} exists"));
            }
        }
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for l in mounts.lines() {
            if let Some(mp) = l.split_whitespace().nth(4) {
                let under_pod = pods
                    .iter()
                    .any(|p| mp.starts_with(&format!("{VEIL_STATE_DIR}/{p}")));
                if under_pod || mp.starts_with(&self.image_dir.display().to_string()) {
                    left.push(format!("mount {mp}"));
                }
            }
        }
        for pod in pods {
            let f = self.scratch_dir.join(format!("{pod}.img"));
            if f.exists() {
                left.push(format!("scratch disk {}", f.display()));
            }
        }
        for n in cache_entries(&self.image_dir) {
            left.push(format!("image cache reference or temporary file {n}"));
        }
        for (uid, pod) in jail_leases() {
            if pods.contains(&pod.as_str()) {
                left.push(format!("jail uid lease {uid} of {pod}"));
            }
        }
        left
    }

    /// Waits (up to 30 s) until `pods` left nothing behind (see
    /// [`Self::leftovers`]), or fails listing what is left.
    pub fn wait_clean(&self, pods: &[&str]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = self.leftovers(pods);
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("left behind after {pods:?}:\n{}", left.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop_child(&mut self) {
        crate::stop_child(&mut self.child, Duration::from_secs(10));
    }
}

/// Starts containerd as `l` says, its output appended to `log`.
fn spawn(l: &Launch, log: &Path) -> Result<Child> {
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut cmd = match &l.netns {
        // nsenter execs containerd: the child's PID is containerd's.
        Some(ns) => {
            let mut c = Command::new(which("nsenter").context("nsenter not found")?);
            c.arg(format!("--net={}", ns.display())).arg(&l.bin);
            c
        }
        None => Command::new(&l.bin),
    };
    cmd.arg("--config")
        .arg(&l.config)
        .env("PATH", &l.path)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting containerd")
}

fn veil_config_text(a: &Artefacts, image_dir: &Path) -> String {
    veil_config(a, image_dir)
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!(
                "containerd log (last lines):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        self.stop_child();
        for (pid, _) in self.shim_processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::SIGKILL,
            );
        }
        for pod in self.new_pod_dirs() {
            if let Ok(d) = veil_shim::state::PodDir::at(Path::new(VEIL_STATE_DIR), &pod) {
                d.cleanup();
            }
            for ns in ["k8s.io", "veil-test", "default"] {
                let a = veil_shim::bootstrap::socket_address(
                    &self.socket.display().to_string(),
                    ns,
                    &pod,
                );
                let _ = fs::remove_file(a.trim_start_matches("unix://"));
            }
        }
        // Pod network namespaces CRI made and did not remove (a test that
        // failed before removing its pod) are below the state dir: unmounted
        // with the rest.
        // Whatever is still mounted below our root (CRI's sandbox shm, ...).
        let root = self.dir.path().display().to_string();
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| m.starts_with(&root))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// A command's status, stdout and stderr, for assertion messages.
pub fn output_text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Finds `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([
            "/usr/sbin".into(),
            "/usr/bin".into(),
            "/sbin".into(),
            "/bin".into(),
        ])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
