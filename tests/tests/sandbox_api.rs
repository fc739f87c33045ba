//! containerd's sandbox API (`containerd.runtime.sandbox.v1.Sandbox`)
//! against the real shim binary, started the way containerd 2.x starts a
//! shim for `sandboxer = "shim"`: `start` with `-namespace`, `-id`,
//! `-address` in the sandbox's bundle, then ttrpc on the address it prints.
//! Debian's containerd 1.6 never uses this API, so the test is containerd:
//! CreateSandbox with a pause-like sandbox spec for `veil-sim`,
//! StartSandbox (the pod VM boots: its QEMU runs), PingSandbox,
//! SandboxStatus, Platform, StopSandbox, WaitSandbox, ShutdownSandbox; then
//! the shim, QEMU and the vsock backend are gone by PID, and nothing is left
//! under `/run/veil/<id>`, in the mounts, the socket dir or the image cache.
//!
//! The sandbox calls publish no task events: `TTRPC_ADDRESS` names a socket
//! nobody listens on (the shim logs that it cannot forward, and goes on).

use std::{
    io::Read,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use containerd_shim_protos::{
    protobuf::well_known_types::any::Any, sandbox_api as sb, sandbox_async::SandboxClient,
};
use veil_tests::{
    containerd::{
        cache_entries, pod_processes, prepare_for_jail, processes, veil_config, VEIL_STATE_DIR,
    },
    rootfs::default_spec,
    vm::pid_alive,
    Artefacts,
};

const NS: &str = "veil-sandbox-api";

/// `runtimeoptions.v1.Options { config_path }` as containerd sends a
/// handler's `ConfigPath` (field 2, length-delimited).
fn runtime_options(config_path: &str) -> Any {
    let mut value = vec![0x12];
    let mut n = config_path.len();
    while n >= 0x80 {
        value.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    value.push(n as u8);
    value.extend_from_slice(config_path.as_bytes());
    Any {
        type_url: "runtimeoptions.v1.Options".into(),
        value,
        ..Default::default()
    }
}

/// The shim's log FIFO in the bundle, read into memory while the test runs
/// (containerd holds the read side; without one the shim logs nowhere).
struct LogReader {
    text: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogReader {
    fn open(bundle: &Path) -> Result<Self> {
        let path = bundle.join("log");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
        // Read-write: the open does not wait for a writer; non-blocking: the
        // thread can stop.
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)?;
        let text = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (Arc::clone(&text), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match f.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        if let Ok(mut v) = t.lock() {
                            v.extend_from_slice(&buf[..n]);
                        }
                        continue;
                    }
                    _ if s.load(Ordering::SeqCst) => return,
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(LogReader {
            text,
            stop,
            thread: Some(thread),
        })
    }

    fn text(&self) -> String {
        self.text
            .lock()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for LogReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the test started and must take down by PID whatever happens.
struct Started {
    id: String,
    socket: PathBuf,
    shim: Option<u32>,
    vm: Vec<u32>,
}

impl Drop for Started {
    fn drop(&mut self) {
        for pid in self.shim.iter().chain(&self.vm) {
            if pid_alive(*pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid as i32),
                    nix::sys::signal::SIGKILL,
                );
            }
        }
        if let Ok(d) = veil_shim::state::PodDir::at(Path::new(VEIL_STATE_DIR), &self.id) {
            d.cleanup();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// `SandboxStatus` of `id`.
async fn status_of(
    sandbox: &SandboxClient,
    id: &str,
    verbose: bool,
) -> Result<sb::SandboxStatusResponse> {
    sandbox
        .sandbox_status(
            ctx(),
            &sb::SandboxStatusRequest {
                sandbox_id: id.into(),
                verbose,
                ..Default::default()
            },
        )
        .await
        .context("SandboxStatus")
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(120).as_nanos() as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shim_serves_containerds_sandbox_api() -> Result<()> {
    ensure!(
        nix::unistd::Uid::effective().is_root(),
        "the sandbox API test boots a pod VM and needs root"
    );
    let a = Artefacts::locate()?;
    let shim_bin = a.require_shim()?.to_path_buf();
    let work = tempfile::Builder::new()
        .prefix("veil-sandbox-api.")
        .tempdir()?;
    let image_dir = work.path().join("images");
    let config = work.path().join("veil.toml");
    // The pod's jailed QEMU and backend pass through the work dir.
    prepare_for_jail(&a, work.path(), &image_dir)?;
    std::fs::write(&config, veil_config(&a, &image_dir))?;
    let id = format!("sbx-{}", std::process::id());
    let bundle = work.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs"))?;
    let mut spec = default_spec(&["/pause"]);
    spec["hostname"] = "sandbox-api".into();
    spec["annotations"] = serde_json::json!({
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-id": id,
        "io.kubernetes.cri.sandbox-name": "sandbox-api",
        "io.kubernetes.cri.sandbox-namespace": "default",
    });
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&spec)?)?;
    let log = LogReader::open(&bundle)?;
    let containerd_address = work.path().join("containerd.sock").display().to_string();
    let address = veil_shim::bootstrap::socket_address(&containerd_address, NS, &id);
    let socket = PathBuf::from(address.trim_start_matches("unix://"));
    let mut started = Started {
        id: id.clone(),
        socket: socket.clone(),
        shim: None,
        vm: Vec::new(),
    };
    let result = scenario(
        &shim_bin,
        &bundle,
        &config,
        &containerd_address,
        &address,
        &mut started,
        work.path(),
    )
    .await;
    if result.is_err() {
        eprintln!("shim log:\n{}", log.text());
    }
    result?;
    drop(log);
    let images = cache_entries(&image_dir);
    ensure!(images.is_empty(), "image cache left: {images:?}");
    drop(started);
    let root = work.path().display().to_string();
    drop(work);
    ensure!(!Path::new(&root).exists(), "{root} left");
    Ok(())
}

async fn scenario(
    shim_bin: &Path,
    bundle: &Path,
    config: &Path,
    containerd_address: &str,
    address: &str,
    started: &mut Started,
    work: &Path,
) -> Result<()> {
    let id = started.id.clone();
    let t0 = Instant::now();
    // containerd: `start` in the bundle, the options on stdin, the
    // events address in the environment; the address comes back on stdout.
    let out = Command::new(shim_bin)
        .args([
            "-namespace",
            NS,
            "-id",
            &id,
            "-address",
            containerd_address,
            "-publish-binary",
            "/bin/true",
            "start",
        ])
        .current_dir(bundle)
        .env("TTRPC_ADDRESS", work.join("events.sock.ttrpc"))
        .stdin(Stdio::null())
        .output()
        .context("running the shim's start")?;
    ensure!(
        out.status.success(),
        "shim start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        printed == address,
        "start printed {printed:?}, not {address:?}"
    );
    let socket = address.trim_start_matches("unix://");
    started.shim = processes()
        .into_iter()
        .find(|(_, c)| c.contains(&format!("-socket {address}")))
        .map(|(pid, _)| pid);
    let shim = started.shim.context("the shim daemon is not running")?;

    let client = ttrpc::asynchronous::Client::connect(address)
        .with_context(|| format!("connecting to {socket}"))?;
    let sandbox = SandboxClient::new(client);

    let cfg = format!("{}#veil-sim", config.display());
    sandbox
        .create_sandbox(
            ctx(),
            &sb::CreateSandboxRequest {
                sandbox_id: id.clone(),
                bundle_path: bundle.display().to_string(),
                options: Some(runtime_options(&cfg)).into(),
                ..Default::default()
            },
        )
        .await
        .context("CreateSandbox")?;
    ensure!(pod_processes(&id).is_empty(), "a VM before StartSandbox");
    let status = status_of(&sandbox, &id, false).await?;
    ensure!(status.state == "SANDBOX_NOTREADY", "{status:?}");

    let t_start = Instant::now();
    let resp = sandbox
        .start_sandbox(
            ctx(),
            &sb::StartSandboxRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            },
        )
        .await
        .context("StartSandbox")?;
    eprintln!("StartSandbox took {:.1?}", t_start.elapsed());
    let vm = pod_processes(&id);
    started.vm = vm.iter().map(|(p, _)| *p).collect();
    let qemu = vm
        .iter()
        .find(|(_, c)| c.contains("qemu-system"))
        .with_context(|| format!("no QEMU of pod {id} after StartSandbox: {vm:?}"))?;
    ensure!(
        resp.pid == qemu.0,
        "StartSandbox answered pid {} but QEMU is {}",
        resp.pid,
        qemu.0
    );
    ensure!(resp.created_at.seconds > 0, "{resp:?}");

    sandbox
        .ping_sandbox(
            ctx(),
            &sb::PingRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            },
        )
        .await
        .context("PingSandbox")?;
    let status = status_of(&sandbox, &id, true).await?;
    ensure!(
        status.state == "SANDBOX_READY"
            && status.pid == qemu.0
            && status.sandbox_id == id
            && status.created_at.seconds == resp.created_at.seconds
            && status.exited_at.is_none(),
        "{status:?}"
    );
    ensure!(status.info.get("phase").map(String::as_str) == Some("running"));
    let platform = sandbox
        .platform(
            ctx(),
            &sb::PlatformRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            },
        )
        .await
        .context("Platform")?;
    ensure!(
        platform.platform.os == "linux" && platform.platform.architecture == "amd64",
        "{platform:?}"
    );
    // A call naming another sandbox is refused, naming the call.
    let wrong = sandbox
        .ping_sandbox(
            ctx(),
            &sb::PingRequest {
                sandbox_id: "another".into(),
                ..Default::default()
            },
        )
        .await;
    match wrong {
        Err(ttrpc::Error::RpcStatus(s)) => ensure!(
            s.code() == ttrpc::Code::NOT_FOUND && s.message().contains("PingSandbox"),
            "{s:?}"
        ),
        other => bail!("PingSandbox of another sandbox: {other:?}"),
    }

    // WaitSandbox waits on its own connection while StopSandbox runs.
    let waiter = {
        let client = ttrpc::asynchronous::Client::connect(address)?;
        let w = SandboxClient::new(client);
        let id = id.clone();
        tokio::spawn(async move {
            w.wait_sandbox(
                ctx(),
                &sb::WaitSandboxRequest {
                    sandbox_id: id,
                    ..Default::default()
                },
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(!waiter.is_finished(), "WaitSandbox returned while running");
    sandbox
        .stop_sandbox(
            ctx(),
            &sb::StopSandboxRequest {
                sandbox_id: id.clone(),
                timeout_secs: 10,
                ..Default::default()
            },
        )
        .await
        .context("StopSandbox")?;
    let waited = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .context("WaitSandbox did not return after StopSandbox")??
        .context("WaitSandbox")?;
    ensure!(
        waited.exit_status == 0 && waited.exited_at.seconds > 0,
        "{waited:?}"
    );
    for (pid, cmd) in &vm {
        ensure!(
            !pid_alive(*pid),
            "{pid} still runs after StopSandbox: {cmd}"
        );
    }
    ensure!(
        !Path::new(VEIL_STATE_DIR).join(&id).exists(),
        "{VEIL_STATE_DIR}/{id} left after StopSandbox"
    );
    let status = status_of(&sandbox, &id, false).await?;
    ensure!(
        status.state == "SANDBOX_NOTREADY" && status.exited_at.seconds == waited.exited_at.seconds,
        "{status:?}"
    );

    sandbox
        .shutdown_sandbox(
            ctx(),
            &sb::ShutdownSandboxRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            },
        )
        .await
        .context("ShutdownSandbox")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while pid_alive(shim) || Path::new(socket).exists() {
        ensure!(
            Instant::now() < deadline,
            "the shim (pid {shim}) or its socket {socket} is still there after ShutdownSandbox"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let pod_dir = format!("{VEIL_STATE_DIR}/{id}");
    let work_dir = work.display().to_string();
    let left: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&pod_dir) || m.starts_with(&work_dir))
        .collect();
    ensure!(left.is_empty(), "mounts left: {left:?}");
    ensure!(pod_processes(&id).is_empty(), "{:?}", pod_processes(&id));
    eprintln!("sandbox API scenario took {:.1?}", t0.elapsed());
    Ok(())
}
