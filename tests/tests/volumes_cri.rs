//! Pod volumes through CRI with the real containerd, each case on a `runc`
//! pod and a `veil` pod of the same containerd and compared. The volume
//! directories are laid out as kubelet lays them out — its atomic writer
//! (`..data` -> `..<timestamp>` directory, user-visible names as symlinks
//! into `..data/`, `veil_shim::volumes::files::fixture`) under
//! `<root>/pods/<uid>/volumes/kubernetes.io~<plugin>/<name>`, a subPath under
//! `volume-subpaths/<volume>/<container>/<index>` and the termination message
//! file under `containers/<container>/<id>`:
//! - a configMap at `/etc/config`, updated the way kubelet updates it: the
//!   container sees the new version (within a bounded poll) and a name that
//!   goes away goes; its subPath at `/etc/app.conf` keeps the old value;
//! - a secret mounted read-only: reads work, writes fail with EROFS, modes
//!   and symlinks are as on the host;
//! - a projected service-account token at
//!   `/var/run/secrets/kubernetes.io/serviceaccount/token`;
//! - the termination message a container writes reaches the host file
//!   kubelet reads;
//! - a mount veil cannot serve (a subPath of an emptyDir) fails the task
//!   create (CRI StartContainer), naming the destination; runc runs it.
//!
//!
//! Directory volumes (`cri_host_directories_…`): a hostPath directory in a
//! plain `veil` pod is the host's own through virtio-fs — what the host
//! writes the container reads and the other way round, as with runc — and
//! the same pod spec under `veil-sim` (a confidential handler, no
//! `shared_dirs`) fails naming the volume, its destination and the key.
//!
//! Afterwards nothing of the veil pods is left: processes (virtiofsd
//! included: it runs with its socket in the pod directory), mounts, the pod
//! directories under /run/veil.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{runtime_service_client::RuntimeServiceClient, ContainerState, Mount};
use tonic::transport::Channel;
use veil_shim::volumes::files::fixture::write_version;
use veil_tests::{containerd::Containerd, cri, Artefacts};

/// The reference first.
const HANDLERS: [&str; 2] = ["runc", "veil"];
/// How long a container may take to see kubelet's update.
const UPDATE_WITHIN: Duration = Duration::from_secs(20);
const TOKEN: &[u8] = b"eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVmYXVsdDpkZWZhdWx0In0.c2lnbmF0dXJl";

/// One pod's volume directories, as kubelet makes them.
struct Layout {
    cfg: PathBuf,
    big: PathBuf,
    creds: PathBuf,
    token: PathBuf,
    subpath: PathBuf,
    app_term: PathBuf,
    term: PathBuf,
    empty_sub: PathBuf,
}

fn lay_out(pod_dir: &Path) -> Result<Layout> {
    let vol = |plugin: &str, name: &str| pod_dir.join("volumes").join(plugin).join(name);
    let l = Layout {
        cfg: vol("kubernetes.io~configmap", "cfg"),
        big: vol("kubernetes.io~configmap", "big"),
        creds: vol("kubernetes.io~secret", "creds"),
        token: vol("kubernetes.io~projected", "kube-api-access-t3st"),
        subpath: pod_dir.join("volume-subpaths/cfg/app/1"),
        app_term: pod_dir.join("containers/app/5f0e3a1c"),
        term: pod_dir.join("containers/term/9b2d7c4e"),
        empty_sub: pod_dir.join("volume-subpaths/scratch/sub/0"),
    };
    write_version(
        &l.cfg,
        "2026_01_02_03_04_05.111111111",
        &[("app.conf", b"version=1\n", 0o644)],
    )?;
    // A ConfigMap at Kubernetes' size limit: 256 keys of 4 KiB (1 MiB).
    let content: Vec<(String, Vec<u8>)> = (0..256)
        .map(|i| (format!("f-{i:03}"), vec![b'a' + (i % 26) as u8; 4096]))
        .collect();
    let files: Vec<(&str, &[u8], u32)> = content
        .iter()
        .map(|(n, c)| (n.as_str(), c.as_slice(), 0o644))
        .collect();
    write_version(&l.big, "2026_01_02_03_04_05.999999999", &files)?;
    write_version(
        &l.creds,
        "2026_01_02_03_04_05.222222222",
        &[("password", b"hunter2", 0o400), ("tls/key", b"KEY", 0o440)],
    )?;
    write_version(
        &l.token,
        "2026_01_02_03_04_05.333333333",
        &[
            ("token", TOKEN, 0o644),
            ("ca.crt", b"-----BEGIN CERTIFICATE-----\n", 0o644),
            ("namespace", b"default", 0o644),
        ],
    )?;
    // kubelet binds the resolved file of the subPath here.
    std::fs::create_dir_all(l.subpath.parent().context("subpath parent")?)?;
    std::fs::copy(l.cfg.join("app.conf"), &l.subpath)?;
    for t in [&l.app_term, &l.term] {
        std::fs::create_dir_all(t.parent().context("termination parent")?)?;
        std::fs::write(t, b"")?;
        std::fs::set_permissions(t, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    }
    std::fs::create_dir_all(pod_dir.join("volumes/kubernetes.io~empty-dir/scratch/sub"))?;
    std::fs::create_dir_all(&l.empty_sub)?;
    Ok(l)
}

fn mount(host: &Path, at: &str, readonly: bool) -> Mount {
    Mount {
        container_path: at.into(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    }
}

/// What the `app` container sees of its volumes.
const LOOK: &str = "cat /etc/config/app.conf /etc/app.conf; readlink /etc/config/app.conf; readlink /etc/config/..data; \
    ls -A /etc/config | tr '\\n' ' '; echo; \
    stat -c '%n %a %u' /etc/creds/..data/password /etc/creds/..data/tls /etc/creds/..data/tls/key; \
    readlink /etc/creds/tls; cat /etc/creds/password; echo; cat /etc/creds/tls/key; echo; \
    (echo x > /etc/creds/password) 2>&1; (touch /etc/config/new) 2>&1; \
    cat /var/run/secrets/kubernetes.io/serviceaccount/token; echo; \
    cat /var/run/secrets/kubernetes.io/serviceaccount/namespace; echo; \
    ls /etc/big | wc -l; cat /etc/big/* | wc -c; md5sum /etc/big/f-255 | cut -d' ' -f1";

struct Seen {
    first: String,
    updated: String,
    pruned: String,
    update_after: Duration,
    termination: String,
}

async fn poll_until(
    cri: &mut RuntimeServiceClient<Channel>,
    id: &str,
    script: &str,
    want: impl Fn(&str) -> bool,
) -> Result<(String, Duration)> {
    let started = Instant::now();
    loop {
        let (out, err, code) = cri::exec(cri, id, script).await?;
        if code == 0 && want(&out) {
            return Ok((out, started.elapsed()));
        }
        if started.elapsed() > UPDATE_WITHIN {
            bail!("{script:?} never gave what was wanted: {out:?} {err:?} (exit {code})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_exited(cri: &mut RuntimeServiceClient<Channel>, id: &str) -> Result<i32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = cri::container_status(cri, id).await?;
        if s.state == ContainerState::ContainerExited as i32 {
            return Ok(s.exit_code);
        }
        if Instant::now() > deadline {
            bail!("container {id} did not exit: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn on_handler(
    c: &Containerd,
    cri: &mut RuntimeServiceClient<Channel>,
    work: &Path,
    handler: &str,
    pods: &mut Vec<(String, String)>,
) -> Result<Seen> {
    let name = format!("vol-{handler}");
    let uid = format!("uid-{name}");
    let l = lay_out(&work.join("kubelet/pods").join(&uid))?;
    let logs = work.join("logs").join(&name);
    std::fs::create_dir_all(&logs)?;
    let config = cri::pod_config(&name, &uid, &name, &logs.display().to_string());
    let pod = cri::run_pod(cri, handler, &config).await?;
    pods.push((handler.to_string(), pod.clone()));

    let app = k8s_cri::v1::ContainerConfig {
        mounts: vec![
            mount(&l.cfg, "/etc/config", true),
            mount(&l.big, "/etc/big", true),
            mount(&l.subpath, "/etc/app.conf", true),
            mount(&l.creds, "/etc/creds", true),
            mount(
                &l.token,
                "/var/run/secrets/kubernetes.io/serviceaccount",
                true,
            ),
            mount(&l.app_term, "/dev/termination-log", false),
        ],
        ..cri::busybox_container("app", &["sleep", "1000"])
    };
    let app = cri::create_container(cri, &pod, &config, app).await?;
    cri::start_container(cri, &app).await?;
    let (first, _, code) = cri::exec(cri, &app, LOOK).await?;
    ensure!(code == 0, "{handler}: look exited {code}: {first}");

    // kubelet's update: a new version, a new name; then the name goes.
    write_version(
        &l.cfg,
        "2026_01_02_03_05_00.444444444",
        &[
            ("app.conf", b"version=2\n", 0o644),
            ("extra", b"more", 0o600),
        ],
    )?;
    let (updated, update_after) = poll_until(
        cri,
        &app,
        "cat /etc/config/app.conf /etc/app.conf /etc/config/extra; readlink /etc/config/..data",
        |o| o.starts_with("version=2\n"),
    )
    .await?;
    write_version(
        &l.cfg,
        "2026_01_02_03_06_00.555555555",
        &[("app.conf", b"version=3\n", 0o644)],
    )?;
    let (pruned, _) = poll_until(
        cri,
        &app,
        "cat /etc/config/app.conf; ls -A /etc/config | tr '\\n' ' '",
        |o| o.starts_with("version=3\n") && !o.contains("extra"),
    )
    .await?;

    // The termination message.
    let term = k8s_cri::v1::ContainerConfig {
        mounts: vec![mount(&l.term, "/dev/termination-log", false)],
        ..cri::busybox_container(
            "term",
            &[
                "sh",
                "-c",
                "echo it ended well > /dev/termination-log; exit 3",
            ],
        )
    };
    let term = cri::create_container(cri, &pod, &config, term).await?;
    cri::start_container(cri, &term).await?;
    let code = wait_exited(cri, &term).await?;
    ensure!(code == 3, "{handler}: term exited {code}");
    let termination = std::fs::read_to_string(&l.term)?;

    // A mount veil does not serve.
    let sub = k8s_cri::v1::ContainerConfig {
        mounts: vec![mount(&l.empty_sub, "/scratch", false)],
        ..cri::busybox_container("sub", &["sleep", "1000"])
    };
    // containerd's CRI creates the task (where the shim judges the spec)
    // at StartContainer.
    let sub = cri::create_container(cri, &pod, &config, sub).await?;
    let started = cri::start_container(cri, &sub).await;
    match (handler, started) {
        ("runc", Ok(())) => {}
        ("runc", Err(e)) => bail!("runc refused the emptyDir subPath: {e:#}"),
        (_, Ok(())) => bail!("{handler} started {sub} with an emptyDir subPath"),
        (_, Err(e)) => {
            let msg = format!("{e:#}");
            ensure!(
                msg.contains(&format!(
                    "the mount at /scratch (from {}) cannot be served in the pod VM",
                    l.empty_sub.display()
                )) && msg.contains("subPath of an emptyDir"),
                "{handler}: unclear refusal: {msg}"
            );
            eprintln!("{handler} refuses: {msg}");
        }
    }
    if handler != "runc" {
        let log = c.log_text();
        for l in log.lines().filter(|l| l.contains("file volumes copied")) {
            eprintln!("{l}");
        }
    }
    cri::remove_pod(cri, &pod).await?;
    Ok(Seen {
        first,
        updated,
        pruned,
        update_after,
        termination,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_file_volumes_reach_the_guest_and_follow_kubelets_updates() -> Result<()> {
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    cri::import_pod_images(&c, work.path())?;
    let mut client = cri::client(&c).await?;
    let mut pods = Vec::new();
    let mut seen = Vec::new();
    let mut result = Ok(());
    for handler in HANDLERS {
        match on_handler(&c, &mut client, work.path(), handler, &mut pods).await {
            Ok(s) => seen.push(s),
            Err(e) => {
                result = Err(e.context(format!("on {handler}")));
                break;
            }
        }
    }
    if let Err(e) = result {
        return Err(clean_up_after(&c, &mut client, &pods, e).await);
    }
    let (runc, veil) = (&seen[0], &seen[1]);
    eprintln!("runc:\n{}\nveil:\n{}", runc.first, veil.first);
    ensure!(
        runc.first.starts_with(
            "version=1\nversion=1\n..data/app.conf\n..2026_01_02_03_04_05.111111111\n"
        ),
        "runc: {}",
        runc.first
    );
    ensure!(
        runc.first.contains("Read-only file system"),
        "runc: {}",
        runc.first
    );
    ensure!(
        veil.first == runc.first,
        "veil sees its volumes differently:\nveil:\n{}\nrunc:\n{}",
        veil.first,
        runc.first
    );
    for (h, s) in HANDLERS.iter().zip(&seen) {
        ensure!(
            s.updated == "version=2\nversion=1\nmore..2026_01_02_03_05_00.444444444\n",
            "{h}: after the update: {:?}",
            s.updated
        );
        ensure!(
            s.pruned == "version=3\n..2026_01_02_03_06_00.555555555 ..data app.conf ",
            "{h}: after the second update: {:?}",
            s.pruned
        );
        ensure!(
            s.termination == "it ended well\n",
            "{h}: termination message {:?}",
            s.termination
        );
        eprintln!("{h}: the update was seen after {:?}", s.update_after);
    }
    c.wait_clean(&veil_pods(&pods))
}

/// The hostPath case on `handler`: Ok(None) when it ran, Ok(Some(refusal))
/// when the start was refused.
async fn host_dir_on(
    cri: &mut RuntimeServiceClient<Channel>,
    work: &Path,
    handler: &str,
    pods: &mut Vec<(String, String)>,
) -> Result<Option<String>> {
    let name = format!("hostdir-{handler}");
    let uid = format!("uid-{name}");
    let host = work.join(&name);
    std::fs::create_dir_all(&host)?;
    std::fs::write(host.join("from-host"), b"written on the host\n")?;
    let logs = work.join("logs").join(&name);
    std::fs::create_dir_all(&logs)?;
    let config = cri::pod_config(&name, &uid, &name, &logs.display().to_string());
    let pod = cri::run_pod(cri, handler, &config).await?;
    pods.push((handler.to_string(), pod.clone()));
    let app = k8s_cri::v1::ContainerConfig {
        mounts: vec![mount(&host, "/data", false)],
        ..cri::busybox_container("app", &["sleep", "1000"])
    };
    let app = cri::create_container(cri, &pod, &config, app).await?;
    if let Err(e) = cri::start_container(cri, &app).await {
        cri::remove_pod(cri, &pod).await?;
        return Ok(Some(format!("{e:#}")));
    }
    let (out, err, code) = cri::exec(
        cri,
        &app,
        "cat /data/from-host && echo written in the container > /data/from-guest && ls /data",
    )
    .await?;
    ensure!(
        code == 0 && out == "written on the host\nfrom-guest\nfrom-host\n",
        "{handler}: {out:?} {err:?} ({code})"
    );
    let back = std::fs::read_to_string(host.join("from-guest"))?;
    ensure!(
        back == "written in the container\n",
        "{handler}: host reads {back:?}"
    );
    // A change on the host while the container runs.
    std::fs::write(host.join("later"), b"later\n")?;
    let (out, _, _) = cri::exec(cri, &app, "cat /data/later").await?;
    ensure!(out == "later\n", "{handler}: {out:?}");
    if handler == "veil" {
        let rss = virtiofsd_rss();
        ensure!(!rss.is_empty(), "no virtiofsd runs for the veil pod");
        eprintln!("virtiofsd of the running veil pod: {rss:?}");
    }
    cri::remove_pod(cri, &pod).await?;
    Ok(None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_host_directories_are_shared_with_plain_pods_and_refused_by_confidential_ones(
) -> Result<()> {
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    cri::import_pod_images(&c, work.path())?;
    let mut client = cri::client(&c).await?;
    let mut pods = Vec::new();
    let mut results = Vec::new();
    let mut failed = None;
    for handler in ["runc", "veil", "veil-sim"] {
        match host_dir_on(&mut client, work.path(), handler, &mut pods).await {
            Ok(r) => results.push(r),
            Err(e) => {
                failed = Some(e.context(format!("on {handler}")));
                break;
            }
        }
    }
    if let Some(e) = failed {
        return Err(clean_up_after(&c, &mut client, &pods, e).await);
    }
    ensure!(results[0].is_none() && results[1].is_none(), "{results:?}");
    let refusal = results[2]
        .clone()
        .context("veil-sim ran the hostPath volume")?;
    let host = work.path().join("hostdir-veil-sim");
    ensure!(
        refusal.contains(&format!(
            "the mount at /data (from {h}) cannot be served in the pod VM: volume {h} is a host directory",
            h = host.display()
        )) && refusal.contains("set shared_dirs = true in [handlers.veil-sim]"),
        "unclear refusal: {refusal}"
    );
    eprintln!("veil-sim refuses: {refusal}");
    c.wait_clean(&veil_pods(&pods))
}

/// RSS of the virtiofsd processes whose command line names a pod
/// directory (kB, from /proc/PID/status).
fn virtiofsd_rss() -> Vec<(u32, String)> {
    veil_tests::containerd::processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("virtiofsd") && cmd.contains("/run/veil/"))
        .map(|(pid, _)| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let rss = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .unwrap_or("VmRSS: ?")
                .to_string();
            (pid, rss)
        })
        .collect()
}

/// The veil pods among (handler, pod) pairs.
fn veil_pods(pods: &[(String, String)]) -> Vec<&str> {
    pods.iter()
        .filter(|(h, _)| h != "runc")
        .map(|(_, p)| p.as_str())
        .collect()
}

/// After a failed case: prints containerd's log, removes every pod, says
/// what the veil pods left; returns the failure.
async fn clean_up_after(
    c: &Containerd,
    cri: &mut RuntimeServiceClient<Channel>,
    pods: &[(String, String)],
    e: anyhow::Error,
) -> anyhow::Error {
    eprintln!("containerd log:\n{}", c.log_text());
    for (_, p) in pods {
        let _ = cri::remove_pod(cri, p).await;
    }
    if let Err(left) = c.wait_clean(&veil_pods(pods)) {
        eprintln!("{left:#}");
    }
    e
}

/// A loop device over a file of the test's, detached (by its path) when
/// dropped.
struct LoopDevice {
    dev: String,
}

impl LoopDevice {
    fn over(file: &Path) -> Result<Self> {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .context("losetup")?;
        ensure!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(LoopDevice {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

/// Block volume case on `handler`: what the container read of the device.
async fn block_on(
    cri: &mut RuntimeServiceClient<Channel>,
    work: &Path,
    handler: &str,
    pods: &mut Vec<(String, String)>,
) -> Result<String> {
    let name = format!("block-{handler}");
    let file = work.join(format!("{name}.img"));
    std::fs::write(&file, vec![0u8; 8 << 20])?;
    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&file)
        .output()
        .context("mkfs.ext4")?;
    ensure!(
        mkfs.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&mkfs.stderr)
    );
    // A tag in the last 4 KiB, which a fresh 8 MiB ext4 leaves unused.
    let tag = format!("block-tag-{handler}");
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&file)?;
        f.seek(std::io::SeekFrom::Start((8 << 20) - 4096))?;
        f.write_all(tag.as_bytes())?;
    }
    let dev = LoopDevice::over(&file)?;
    let uid = format!("uid-{name}");
    let logs = work.join("logs").join(&name);
    std::fs::create_dir_all(&logs)?;
    let config = cri::pod_config(&name, &uid, &name, &logs.display().to_string());
    let pod = cri::run_pod(cri, handler, &config).await?;
    pods.push((handler.to_string(), pod.clone()));
    let app = k8s_cri::v1::ContainerConfig {
        devices: vec![k8s_cri::v1::Device {
            container_path: "/dev/xvda".into(),
            host_path: dev.dev.clone(),
            permissions: "rwm".into(),
        }],
        ..cri::busybox_container("app", &["sleep", "1000"])
    };
    let app = cri::create_container(cri, &pod, &config, app).await?;
    cri::start_container(cri, &app).await?;
    let (out, err, code) = cri::exec(
        cri,
        &app,
        "test -b /dev/xvda && echo block; \
         dd if=/dev/xvda bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1; \
         dd if=/dev/xvda bs=4096 skip=2047 count=1 2>/dev/null | head -c 14; echo; \
         echo written-in-container | dd of=/dev/xvda bs=4096 seek=2046 conv=notrunc 2>/dev/null && sync && echo ok",
    )
    .await?;
    ensure!(code == 0, "{handler}: {out:?} {err:?} ({code})");
    cri::remove_pod(cri, &pod).await?;
    drop(dev);
    let back = std::fs::read(&file)?;
    let at = (8 << 20) - 8192;
    ensure!(
        back[at..].starts_with(b"written-in-container\n"),
        "{handler}: the container's write is not on the device"
    );
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_block_volumes_appear_at_their_device_path() -> Result<()> {
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    cri::import_pod_images(&c, work.path())?;
    let mut client = cri::client(&c).await?;
    let mut pods = Vec::new();
    let mut seen = Vec::new();
    for handler in HANDLERS {
        match block_on(&mut client, work.path(), handler, &mut pods).await {
            Ok(s) => seen.push(s),
            Err(e) => return Err(clean_up_after(&c, &mut client, &pods, e.context(handler)).await),
        }
    }
    for (h, s) in HANDLERS.iter().zip(&seen) {
        let tag = format!("block-tag-{h}");
        ensure!(s == &format!("block\n 53 ef\n{tag}\nok\n"), "{h}: {s:?}");
    }
    c.wait_clean(&veil_pods(&pods))
}
