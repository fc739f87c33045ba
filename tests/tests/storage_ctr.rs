//! Confidential pod storage end to end, through a private containerd and
//! `ctr`: real QEMU (TCG), the real guest kernel and agent, real
//! dm-crypt and dm-verity in the guest, the real `veil-kbs`.
//!
//! - a `veil-sim` pod attests, gets its disk key and image policy from the
//!   broker, and writes a marker (1 MiB random + a string) to its root
//!   filesystem and to an emptyDir; the host-side scratch file holds a LUKS2
//!   header and neither marker; the container reads both back;
//! - the broker refusing (measurement not registered) stops the pod before
//!   any container process runs; an image whose root hash the released
//!   policy does not list is refused;
//! - one flipped byte in the host-side image file makes reading that block
//!   fail with an I/O error in a running container, and a new pod from the
//!   image fails cleanly.
//!
//! emptyDir is modelled as kubelet makes it: a host directory
//! `…/volumes/kubernetes.io~empty-dir/NAME` bind-mounted into the container
//! (`ctr run --mount`); the shim maps it to `volumes/NAME` on the scratch
//! disk. The image name for the policy comes from the `io.veil.image-name`
//! annotation (CRI sets `io.kubernetes.cri.image-name` itself).
//!
//! Every step checks that no shim, QEMU, vsock backend, mount, pod directory
//! or cached image is left behind.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::fs::FileExt,
    path::PathBuf,
    process::{Child, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};
use veil_tests::{
    containerd::{output_text as text, Containerd},
    oci,
    storage::{
        file_contains, find, random, run_args, scratch_file, Confidential as Env, DISK, IMAGES,
        LUKS_MAGIC, NS, SCRATCH_MIB,
    },
    Artefacts,
};

/// Lines of a child's stdout, read on a thread.
fn line_reader(child: &mut Child) -> Result<mpsc::Receiver<String>> {
    let out = child.stdout.take().context("child stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

fn wait_line(rx: &mpsc::Receiver<String>, want: &str, timeout: Duration) -> Result<Vec<String>> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let done = l.trim() == want;
                seen.push(l);
                if done {
                    return Ok(seen);
                }
            }
            Err(_) => bail!("no line {want:?} within {timeout:?}; saw {seen:?}"),
        }
    }
}

/// Kills `child` (a `ctr` we started) if it is still running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

#[test]
fn confidential_pod_writes_reach_the_host_only_as_ciphertext() -> Result<()> {
    let env = Env::new()?;
    let result = writes_are_ciphertext(&env);
    if result.is_err() {
        eprintln!("containerd log:\n{}", env.c.log_text());
    }
    result
}

fn writes_are_ciphertext(env: &Env) -> Result<()> {
    let c = &env.c;
    let root_hash = env.busybox_root_hash()?;
    let key = env.resources(&root_hash)?;
    let reference = env.register("storage-pod", |_| {})?;
    let broker = env.start_broker("storage-pod")?;

    let id = "storage-marker";
    let vol = env
        .work
        .path()
        .join("pod/volumes/kubernetes.io~empty-dir/data");
    std::fs::create_dir_all(&vol)?;
    let pattern = random(1 << 20)?;
    let tag = format!("veil-marker-{}", hex::encode(random(12)?));
    // The container takes exactly 1 MiB from stdin, appends the string, copies
    // the file to the emptyDir, syncs, says so, then waits for stdin to close
    // and reads both files back.
    let script = format!(
        "head -c 1048576 > /marker && echo {tag} >> /marker && cp /marker /data/marker && sync \
         && echo written && read x; sha256sum /marker /data/marker"
    );
    let mut args = env.run_args("veil-sim", oci::BUSYBOX_IMAGE);
    args.extend([
        "--rm".into(),
        "--mount".into(),
        format!("type=bind,src={},dst=/data,options=rbind:rw", vol.display()),
        oci::BUSYBOX_IMAGE.into(),
        id.into(),
        "sh".into(),
        "-c".into(),
        script,
    ]);
    let mut child = Reaped(
        c.ctr(NS)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let lines = line_reader(&mut child.0)?;
    let mut stdin = child.0.stdin.take().context("ctr stdin")?;
    stdin.write_all(&pattern)?;
    stdin.flush()?;
    if let Err(e) = wait_line(&lines, "written", Duration::from_secs(600)) {
        let _ = child.0.kill();
        let mut err = String::new();
        if let Some(mut s) = child.0.stderr.take() {
            let _ = s.read_to_string(&mut err);
        }
        bail!(
            "{e}\nctr stderr: {err}\nbroker audit:\n{}",
            broker.audit_text()
        );
    }

    // The host side: a LUKS2 header, and neither the string nor any sampled
    // piece of the pattern anywhere in the file.
    let scratch = scratch_file(c, id);
    let disk = std::fs::read(&scratch).with_context(|| format!("reading {}", scratch.display()))?;
    ensure!(
        disk.len() as u64 == SCRATCH_MIB << 20,
        "scratch file is {} bytes",
        disk.len()
    );
    ensure!(disk.starts_with(LUKS_MAGIC), "no LUKS2 header at offset 0");
    ensure!(
        find(&disk, tag.as_bytes()).is_none(),
        "the marker string is in the host-side scratch file"
    );
    for off in [0usize, 4096 * 37 + 5, (1 << 19) + 11, (1 << 20) - 256] {
        ensure!(
            find(&disk, &pattern[off..off + 256]).is_none(),
            "pattern bytes at {off} are in the host-side scratch file"
        );
    }
    let written = disk
        .chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count();
    ensure!(
        written >= 2 * 256,
        "only {written} non-zero blocks: the 2 MiB written did not reach the disk"
    );
    drop(disk);
    ensure!(
        !file_contains(&scratch, &key)?,
        "the disk key is in the scratch file"
    );
    ensure!(
        std::fs::read_dir(&vol)?.next().is_none(),
        "the host emptyDir directory got files: the volume did not go to the scratch disk"
    );

    // The container reads both back.
    drop(stdin);
    let mut want = Sha256::new();
    want.update(&pattern);
    want.update(format!("{tag}\n").as_bytes());
    let want = hex::encode(want.finalize());
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.0.try_wait()? {
            break s;
        }
        ensure!(Instant::now() < deadline, "the container did not exit");
        std::thread::sleep(Duration::from_millis(100));
    };
    let rest: Vec<String> = lines.try_iter().collect();
    ensure!(status.success(), "ctr run: {status}; output {rest:?}");
    let sums: Vec<&String> = rest.iter().filter(|l| l.starts_with(&want)).collect();
    ensure!(
        sums.len() == 2,
        "sha256 {want} of both copies expected, got {rest:?}"
    );

    // The broker released both resources to the registered measurement.
    let releases: Vec<serde_json::Value> = broker
        .audit_events()
        .into_iter()
        .filter(|e| e["outcome"] == "release")
        .collect();
    for r in [DISK, IMAGES] {
        ensure!(
            releases
                .iter()
                .any(|e| e["resource"] == r && e["measurement"] == reference.as_str()),
            "no release of {r} in the audit:\n{}",
            broker.audit_text()
        );
    }
    ensure!(!broker.audit_text().contains(&hex::encode(&key)));
    c.wait_clean(&[id])?;
    Ok(())
}

/// Runs `echo RAN` in a new `veil-sim` pod, which must fail; returns ctr's
/// output after checking that the container never ran and nothing is left.
fn refused_run(c: &Containerd, id: &str) -> Result<String> {
    let mut args = run_args(c, "veil-sim", oci::BUSYBOX_IMAGE);
    args.extend([
        "--rm".into(),
        oci::BUSYBOX_IMAGE.into(),
        id.into(),
        "echo".into(),
        "RAN".into(),
    ]);
    let out = c.ctr(NS).args(&args).output()?;
    ensure!(!out.status.success(), "the pod started: {}", text(&out));
    ensure!(
        !String::from_utf8_lossy(&out.stdout).contains("RAN"),
        "the container process ran: {}",
        text(&out)
    );
    let tasks = c.ctr_ok(NS, &["task", "ls"])?;
    ensure!(
        !String::from_utf8_lossy(&tasks.stdout).contains(id),
        "a task is left: {}",
        text(&tasks)
    );
    // ctr leaves the container record when task creation fails.
    let _ = c.ctr(NS).args(["containers", "delete", id]).output();
    c.wait_clean(&[id])?;
    eprintln!("{id}: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(text(&out))
}

#[test]
fn broker_refusal_and_a_foreign_root_hash_stop_the_pod() -> Result<()> {
    let env = Env::new()?;
    let result = refusals(&env);
    if result.is_err() {
        eprintln!("containerd log:\n{}", env.c.log_text());
    }
    result
}

fn refusals(env: &Env) -> Result<()> {
    let root_hash = env.busybox_root_hash()?;
    env.resources(&root_hash)?;
    // The security officer approved a different command line (one word).
    env.register("approved", |c| c.push_str(" veil.log=info"))?;
    let broker = env.start_broker("approved")?;
    let out = refused_run(&env.c, "storage-refused")?;
    ensure!(
        out.contains("refused") && out.contains("not among the reference values"),
        "the error does not say the broker refused: {out}"
    );
    let audit = broker.audit_events();
    ensure!(
        audit.iter().any(|e| e["outcome"] == "refusal"),
        "no refusal in the audit:\n{}",
        broker.audit_text()
    );
    ensure!(
        !audit.iter().any(|e| e["outcome"] == "release"),
        "{}",
        broker.audit_text()
    );
    drop(broker);

    // The pod's measurement is approved, but the image policy lists another
    // root hash for busybox: the key is released, the image refused.
    env.resources(&"ab".repeat(32))?;
    env.register("storage-pod", |_| {})?;
    let broker = env.start_broker("storage-pod")?;
    let out = refused_run(&env.c, "storage-foreign")?;
    ensure!(
        out.contains(&root_hash) && out.contains("does not allow"),
        "the error does not name the refused root hash {root_hash}: {out}"
    );
    ensure!(
        broker
            .audit_events()
            .iter()
            .any(|e| e["outcome"] == "release" && e["resource"] == IMAGES),
        "{}",
        broker.audit_text()
    );
    Ok(())
}

#[test]
fn a_flipped_image_byte_fails_that_read_and_new_pods_cleanly() -> Result<()> {
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let result = flipped_byte(&a, &c);
    if result.is_err() {
        eprintln!("containerd log:\n{}", c.log_text());
    }
    result
}

fn flipped_byte(a: &Artefacts, c: &Containerd) -> Result<()> {
    const IMAGE: &str = "docker.io/veil-test/busybox-blob:1";
    let work = tempfile::tempdir()?;
    let blob = random(2 << 20)?;
    let (archive, _) = oci::busybox_archive_with(work.path(), IMAGE, &[("/blob", &blob)])?;
    c.import(NS, &archive)?;
    // A plain pod (ephemeral scratch key, no broker): dm-verity with the
    // shim's root hash.
    c.configure(a, &[("veil", "scratch_disk_mib = 32")])?;

    let holder = "verity-holder";
    let mut args = run_args(c, "veil", IMAGE);
    args.extend([
        "-d".into(),
        IMAGE.into(),
        holder.into(),
        "sleep".into(),
        "1000".into(),
    ]);
    let out = c.ctr(NS).args(&args).output()?;
    ensure!(out.status.success(), "{}", text(&out));
    let result = corrupt_and_check(c, holder, &blob, IMAGE);
    let _ = c
        .ctr(NS)
        .args(["task", "kill", "-s", "KILL", holder])
        .output();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let del = c.ctr(NS).args(["task", "delete", holder]).output()?;
        if del.status.success() || String::from_utf8_lossy(&del.stderr).contains("not found") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = c.ctr(NS).args(["containers", "delete", holder]).output();
    result?;
    c.wait_clean(&[holder, "verity-new"])
}

fn corrupt_and_check(c: &Containerd, holder: &str, blob: &[u8], image: &str) -> Result<()> {
    // The image the pod runs from, in the shared cache.
    let images: Vec<PathBuf> = std::fs::read_dir(&c.image_dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "erofs"))
        .collect();
    let [img] = images.as_slice() else {
        bail!("expected one image in the cache, found {images:?}");
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)?;
    let data = std::fs::read(img)?;
    let block = 100usize;
    let at = find(&data, &blob[block * 4096..(block + 1) * 4096])
        .context("the blob's block is not in the image")?;
    ensure!(at % 4096 == 0, "blob block at unaligned offset {at}");
    drop(data);
    let flip = |off: u64| -> Result<()> {
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off)?;
        b[0] ^= 0x01;
        f.write_all_at(&b, off)?;
        f.sync_all()?;
        Ok(())
    };
    flip(at as u64 + 17)?;

    let exec = |exec_id: &str, skip: usize| -> Result<Output> {
        Ok(c.ctr(NS)
            .args([
                "task",
                "exec",
                "--exec-id",
                exec_id,
                holder,
                "dd",
                "if=/blob",
                "of=/dev/null",
                "bs=4096",
                "count=1",
            ])
            .arg(format!("skip={skip}"))
            .output()?)
    };
    let bad = exec("read-flipped", block)?;
    let msg = text(&bad);
    ensure!(
        !bad.status.success(),
        "reading the flipped block succeeded: {msg}"
    );
    ensure!(
        msg.contains("I/O error") || msg.contains("Input/output error"),
        "expected an I/O error: {msg}"
    );
    eprintln!(
        "reading the flipped block: {}",
        String::from_utf8_lossy(&bad.stderr).trim()
    );
    let good = exec("read-intact", 20)?;
    ensure!(
        good.status.success(),
        "an intact block failed: {}",
        text(&good)
    );

    // A byte of block 0 (before erofs's superblock): a new pod from the image
    // cannot even mount it, and fails cleanly.
    flip(7)?;
    let id = "verity-new";
    let mut args = run_args(c, "veil", image);
    args.extend([
        "--rm".into(),
        image.into(),
        id.into(),
        "echo".into(),
        "RAN".into(),
    ]);
    let out = c.ctr(NS).args(&args).output()?;
    ensure!(
        !out.status.success(),
        "a pod started from a corrupted image: {}",
        text(&out)
    );
    ensure!(
        !String::from_utf8_lossy(&out.stdout).contains("RAN"),
        "{}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("does not match its root hash") && err.contains("Input/output error"),
        "expected a dm-verity I/O error: {}",
        text(&out)
    );
    eprintln!("new pod from the corrupted image: {}", err.trim());
    let _ = c.ctr(NS).args(["containers", "delete", id]).output();
    Ok(())
}
