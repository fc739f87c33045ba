//! The shim's root image cache through a private containerd and `ctr`, with
//! real QEMU pods:
//!
//! - two pods of one image, one after the other: the image is built once
//!   (same file, one "built root image" line), the second pod takes it from
//!   the cache faster than the first built it, and the image stays cached
//!   after both are gone with no reference left;
//! - a bound (`image_cache_mib`) that holds one image: a pod of another image
//!   makes the cache drop the least recently used one;
//! - a shim SIGKILLed while containerd is frozen, and containerd's record of
//!   the task lost, so that `delete` never runs: the dead pod's reference
//!   stays until the next pod's acquire collects it.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use veil_tests::{
    containerd::{cache_entries, output_text, pod_processes, veil_config, Containerd},
    oci, Artefacts,
};

const NS: &str = "veil-test";
const RUNTIME: &str = "io.containerd.veil.v2";
/// busybox with 4 MiB of incompressible data: a bigger image than busybox.
const BIG_IMAGE: &str = "docker.io/veil-test/busybox-big:1";

fn ctr_run(c: &Containerd, extra: &[&str], image: &str, id: &str, cmd: &[&str]) -> Result<Output> {
    let rt = c.runtime_config("veil");
    Ok(c.ctr(NS)
        .arg("run")
        .args(["--runtime", RUNTIME, "--runtime-config-path", &rt])
        .args(extra)
        .args([image, id])
        .args(cmd)
        .output()?)
}

fn run_echo(c: &Containerd, image: &str, id: &str) -> Result<()> {
    let out = ctr_run(c, &["--rm"], image, id, &["echo", "hi"])?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == "hi\n",
        "ctr run {id}: {}",
        output_text(&out)
    );
    c.wait_clean(&[id])
}

/// The images in the cache: (path, disk bytes with the dm-verity record).
fn images(c: &Containerd) -> Result<Vec<(PathBuf, u64)>> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(&c.image_dir)?.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "erofs") {
            let mut rec = p.clone().into_os_string();
            rec.push(".verity");
            let bytes = p.metadata()?.blocks() * 512
                + Path::new(&rec).metadata().map(|m| m.blocks() * 512)?;
            found.push((p, bytes));
        }
    }
    found.sort();
    Ok(found)
}

fn one_image(c: &Containerd) -> Result<(PathBuf, u64)> {
    match images(c)?.as_slice() {
        [one] => Ok(one.clone()),
        other => bail!("expected one image in the cache, found {other:?}"),
    }
}

/// The `ms` of the shim's log lines with `msg`.
fn acquire_ms(log: &str, msg: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(msg))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("ms="))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

/// The shim's rootfs attach phase of container `id` (from its `veil-phases`
/// line: the mark before `rootfs_attached` → `rootfs_attached`) and its pod
/// start (`create` → `container_started`).
fn phase(c: &Containerd, id: &str) -> Result<(Duration, Duration)> {
    let log = c.log_text();
    let needle = format!("container={id} ");
    let marks: std::collections::HashMap<String, u128> = log
        .lines()
        .rfind(|l| l.contains("veil-phases") && l.contains(&needle))
        .and_then(veil_shim::phases::parse_line)
        .with_context(|| format!("no veil-phases line for {id}"))?
        .into_iter()
        .collect();
    let mark = |m: &str| {
        marks
            .get(m)
            .copied()
            .with_context(|| format!("no {m} mark for {id}"))
    };
    let from = ["scratch_ready", "attested", "agent_ready"]
        .iter()
        .find_map(|m| marks.get(*m))
        .with_context(|| format!("no mark before rootfs_attached for {id}"))?;
    let span =
        |a: u128, b: u128| Duration::from_nanos(u64::try_from(b.saturating_sub(a)).unwrap_or(0));
    Ok((
        span(*from, mark("rootfs_attached")?),
        span(mark("create")?, mark("container_started")?),
    ))
}

/// Writes the veil config with `image_cache_mib` set (None: the default).
fn set_bound(a: &Artefacts, c: &Containerd, mib: Option<u64>) -> Result<()> {
    let base = veil_config(a, &c.image_dir);
    let text = match mib {
        Some(m) => format!("image_cache_mib = {m}\n{base}"),
        None => base,
    };
    std::fs::write(&c.veil_config, text)?;
    Ok(())
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn images_stay_cached_within_the_bound_and_dead_pods_refs_are_collected() -> Result<()> {
    let a = Artefacts::locate()?;
    let mut c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    let result = scenario(&a, &mut c, work.path());
    if result.is_err() {
        let log = c.log_text();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!(
            "containerd log (last lines):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    // What `delete` never cleaned for the killed pod: its directory, scratch
    // disk and socket (the cache's part is what the scenario checks).
    forget_crashed_pod(&c, CRASHED);
    result
}

const CRASHED: &str = "crash-1";

fn scenario(a: &Artefacts, c: &mut Containerd, work: &Path) -> Result<()> {
    c.import(NS, &oci::busybox_archive(work)?)?;
    let noise: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (big, _) = oci::busybox_archive_with(work, BIG_IMAGE, &[("/noise", &noise)])?;
    c.import(NS, &big)?;

    // Two pods of one image, one after the other.
    run_echo(c, BIG_IMAGE, "cache-1")?;
    let (img, big_bytes) = one_image(c)?;
    let first = img.metadata()?;
    run_echo(c, BIG_IMAGE, "cache-2")?;
    let (img2, _) = one_image(c)?;
    let second = img2.metadata()?;
    ensure!(
        img2 == img && second.ino() == first.ino() && second.mtime() == first.mtime(),
        "the second pod's image is not the first pod's file"
    );
    let log = c.log_text();
    let built = acquire_ms(&log, "built root image");
    let reused = acquire_ms(&log, "root image from the cache");
    ensure!(
        built.len() == 1,
        "{} image builds for two pods of one image",
        built.len()
    );
    // Each pod acquires its image twice: built (or reused) while its VM
    // boots, then found again when the container's rootfs is attached.
    ensure!(
        reused.len() >= 2,
        "the second pod did not take the image from the cache"
    );
    let (t1, t2) = (phase(c, "cache-1")?, phase(c, "cache-2")?);
    eprintln!(
        "image {} KiB: acquire {} ms built (first pod), {} ms from the cache (second pod); \
         rootfs attach {:.1} / {:.1} ms, pod start {:.0} / {:.0} ms (first / second pod)",
        big_bytes / 1024,
        built[0],
        reused.iter().max().copied().unwrap_or(0),
        t1.0.as_secs_f64() * 1e3,
        t2.0.as_secs_f64() * 1e3,
        t1.1.as_secs_f64() * 1e3,
        t2.1.as_secs_f64() * 1e3,
    );
    ensure!(
        reused.iter().all(|ms| *ms < built[0]),
        "taking the image from the cache ({reused:?} ms) was not faster than building it ({} ms)",
        built[0]
    );
    let refs = cache_entries(&c.image_dir);
    ensure!(refs.is_empty(), "references left: {refs:?}");

    // A bound that holds the big image but not both: a pod of busybox makes
    // the big image, least recently used and held by no pod, go.
    let bound = big_bytes.div_ceil(1 << 20);
    set_bound(a, c, Some(bound))?;
    run_echo(c, oci::BUSYBOX_IMAGE, "small-1")?;
    let (small, small_bytes) = one_image(c)?;
    ensure!(small != img, "the big image stayed, the new one went");
    ensure!(
        small_bytes <= bound << 20,
        "busybox ({small_bytes} bytes) does not fit the {bound} MiB bound"
    );
    ensure!(
        c.log_text()
            .contains("removed the least recently used cached root image"),
        "no log line for the collected image"
    );
    set_bound(a, c, None)?;

    // A shim killed while containerd does not look, and containerd's record
    // of the task gone: nobody runs `delete`.
    let out = ctr_run(c, &["-d"], oci::BUSYBOX_IMAGE, CRASHED, &["sleep", "600"])?;
    ensure!(out.status.success(), "ctr run -d: {}", output_text(&out));
    wait_until("the crash pod to run", Duration::from_secs(60), || {
        c.task_status(NS, CRASHED).is_ok_and(|s| s == "RUNNING")
    })?;
    let shim = c
        .shim_processes()
        .into_iter()
        .find(|(_, cmd)| cmd.split_whitespace().any(|w| w == CRASHED))
        .map(|(pid, _)| pid)
        .context("no shim for the crash pod")?;
    let containerd = Pid::from_raw(i32::try_from(c.pid())?);
    kill(containerd, Signal::SIGSTOP)?;
    let killed = (|| -> Result<()> {
        kill(Pid::from_raw(i32::try_from(shim)?), Signal::SIGKILL)?;
        wait_until("the shim and its VM to go", Duration::from_secs(30), || {
            veil_shim::state::start_time(shim).is_none() && pod_processes(CRASHED).is_empty()
        })?;
        // containerd (frozen) never learns of it: kill it and drop its task
        // record, as if its state were lost with it.
        kill(containerd, Signal::SIGKILL)?;
        let bundle = c
            .dir()
            .join("state/io.containerd.runtime.v2.task")
            .join(NS)
            .join(CRASHED);
        unmount_below(&bundle);
        std::fs::remove_dir_all(&bundle).with_context(|| format!("removing {}", bundle.display()))
    })();
    if killed.is_err() {
        let _ = kill(containerd, Signal::SIGCONT);
    }
    killed?;
    c.restart()?;
    let crashed_ref = |c: &Containerd| {
        cache_entries(&c.image_dir)
            .into_iter()
            .any(|r| r.ends_with(&format!("/{CRASHED}")))
    };
    ensure!(
        crashed_ref(c),
        "the killed pod's reference went before any acquire: {:?}",
        cache_entries(&c.image_dir)
    );
    // The next pod's acquire collects it; the image stays cached.
    run_echo(c, oci::BUSYBOX_IMAGE, "after-crash")?;
    ensure!(
        !crashed_ref(c),
        "the killed pod's reference is still there: {:?}",
        cache_entries(&c.image_dir)
    );
    ensure!(one_image(c)?.0 == small, "the cached image changed");
    let refs = cache_entries(&c.image_dir);
    ensure!(refs.is_empty(), "references left: {refs:?}");
    let _ = c.ctr(NS).args(["containers", "rm", CRASHED]).output();
    Ok(())
}

/// Lazily unmounts every mount point below `dir`.
fn unmount_below(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.display().to_string();
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Removes what a pod whose `delete` never ran leaves outside the cache.
fn forget_crashed_pod(c: &Containerd, id: &str) {
    if let Ok(d) =
        veil_shim::state::PodDir::at(Path::new(veil_tests::containerd::VEIL_STATE_DIR), id)
    {
        d.cleanup();
    }
    let _ = std::fs::remove_file(c.scratch_dir.join(format!("{id}.img")));
    let a = veil_shim::bootstrap::socket_address(&c.socket.display().to_string(), NS, id);
    let _ = std::fs::remove_file(a.trim_start_matches("unix://"));
}
