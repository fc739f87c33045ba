//! Scratch-disk throughput: the pod's encrypted scratch disk (LUKS2,
//! aes-xts-plain64 with 4096-byte sectors, dm-crypt in the guest, ext4 made
//! by the agent), the same with integrity (dm-integrity, HMAC-SHA256 tags in
//! guest memory), and an unencrypted ext4 disk attached to the same VM,
//! measured in the same run by the same container.
//!
//! One pod VM (the agent's initrd plus a busybox image) boots with three
//! disks on its SCSI controller: two sparse files the agent opens as scratch
//! disks (a plain pod: ephemeral key), one of them with integrity, and a
//! file formatted by the host's `mkfs.ext4` (no journal, like the scratch
//! filesystem) mounted as is. The time each scratch disk's AddStorage takes
//! (format and mount) is printed once. A busybox container then alternates,
//! per run, `dd` writes (`oflag=direct`, `conv=fsync`) and reads
//! (`iflag=direct`) of N MiB on each, timed with the guest's uptime. Medians
//! of the runs are reported with the ratio to the unencrypted disk.
//!
//! Under TCG the CPU emulates AES-NI, so absolute numbers are far below a
//! KVM node's; the ratio is what to look at.
//!
//! Run: `cargo bench -p veil-benches --bench scratch` (`VEIL_BENCH_RUNS`,
//! default 5; `VEIL_BENCH_MIB`, default 64; needs `ci/build-artefacts.sh`).

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use tokio::io::AsyncReadExt;
use veil_benches::runs;
use veil_protocol::{
    agent::{
        AddStorageRequest, ContainerRequest, CreateContainerRequest, CreateSandboxRequest,
        ProcessRequest, Rootfs, StorageSource, StreamKind,
    },
    agent_ttrpc::{ContainersClient, SandboxClient},
};
use veil_shim::vmm::BootDisk;
use veil_test_support::{rootfs, Artefacts, TestVm, VmOptions};

/// The size of each disk: the default scratch disk's.
const DISK_MIB: u64 = 1024;

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(600).as_nanos() as i64)
}

fn sparse(path: &Path, mib: u64) -> Result<()> {
    std::fs::File::create(path)?.set_len(mib << 20)?;
    Ok(())
}

fn storage(id: &str, serial: &str) -> AddStorageRequest {
    let mut r = AddStorageRequest::new();
    r.storage_id = id.into();
    r.source = StorageSource::BLOCK_SERIAL.into();
    r.locator = serial.into();
    r.fstype = "ext4".into();
    r.wait_ms = 30_000;
    r
}

/// Seconds of the operation the script timed as `TAG start end` (guest
/// uptime, 10 ms resolution: plenty for dd runs of seconds under TCG).
fn timed(out: &str, tag: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.starts_with(tag))?;
    let mut w = line.split_whitespace().skip(1);
    let start: f64 = w.next()?.parse().ok()?;
    let end: f64 = w.next()?.parse().ok()?;
    Some((end - start).max(0.01))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `script` in a new container of the pod; returns its output.
async fn run(vm: &TestVm, c: &ContainersClient, id: &str, script: &str) -> Result<String> {
    let mut spec = rootfs::default_spec(&["sh", "-c", script]);
    let mounts = spec["mounts"]
        .as_array_mut()
        .context("default spec has no mounts")?;
    for (dest, src) in [
        ("/enc", "storage:scratch/bench"),
        ("/integ", "storage:integ/bench"),
        ("/plain", "storage:plain"),
    ] {
        mounts.push(serde_json::json!({
            "destination": dest, "type": "bind", "source": src, "options": ["rbind", "rw"],
        }));
    }
    let mut r = CreateContainerRequest::new();
    r.container_id = id.into();
    r.oci_spec = serde_json::to_vec(&spec)?;
    let mut root = Rootfs::new();
    root.storage_id = "bb".into();
    r.rootfs = Some(root).into();
    let mut io = veil_protocol::agent::Stdio::new();
    io.stdout = true;
    r.stdio = Some(io).into();
    c.create_container(ctx(), &r)
        .await
        .with_context(|| format!("create {id}; console:\n{}", vm.console()))?;
    let mut out = vm
        .connect(veil_protocol::STREAM_VSOCK_PORT, Duration::from_secs(30))
        .await?;
    veil_protocol::stream::open(&mut out, id, "", StreamKind::STDOUT).await?;
    let mut cr = ContainerRequest::new();
    cr.container_id = id.into();
    c.start_container(ctx(), &cr).await?;
    let mut pr = ProcessRequest::new();
    pr.container_id = id.into();
    let w = c.wait_process(ctx(), &pr).await?;
    let mut s = String::new();
    out.read_to_string(&mut s).await?;
    c.remove_container(ctx(), &cr).await?;
    if w.exit_status != 0 {
        bail!("{id} exited {}: {s}", w.exit_status);
    }
    Ok(s)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = Artefacts::locate()?;
    let n = runs(5);
    let mib: u64 = std::env::var("VEIL_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let dir = tempfile::Builder::new()
        .prefix("veil-bench-scratch.")
        .tempdir()?;
    let enc = dir.path().join("scratch.img");
    sparse(&enc, DISK_MIB)?;
    let integ = dir.path().join("integ.img");
    sparse(&integ, DISK_MIB)?;
    let plain = dir.path().join("plain.img");
    sparse(&plain, DISK_MIB)?;
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal", "-b", "4096"])
        .arg(&plain)
        .status()
        .context("running mkfs.ext4")?;
    if !st.success() {
        bail!("mkfs.ext4 failed");
    }
    let mut opts = VmOptions::agent(&a);
    opts.initrd = rootfs::agent_initrd_with_busybox(&a, dir.path())?;
    opts.memory_mib = 512;
    opts.disks = vec![
        BootDisk {
            path: enc.clone(),
            serial: veil_shim::storage::scratch::SERIAL.into(),
            read_only: false,
        },
        BootDisk {
            path: integ.clone(),
            serial: "veil-integ".into(),
            read_only: false,
        },
        BootDisk {
            path: plain.clone(),
            serial: "veil-plain".into(),
            read_only: false,
        },
    ];
    let vm = TestVm::boot(&a, &opts)?;
    let client = vm.agent_client(Duration::from_secs(120)).await?;
    let sandbox = SandboxClient::new(client.clone());
    let containers = ContainersClient::new(client);
    let mut sb = CreateSandboxRequest::new();
    sb.sandbox_id = "bench".into();
    sandbox.create_sandbox(ctx(), &sb).await?;
    let mut bb = AddStorageRequest::new();
    bb.storage_id = "bb".into();
    bb.source = StorageSource::IMAGE_FILE.into();
    bb.locator = "/images/busybox.img".into();
    bb.fstype = "ext4".into();
    bb.read_only = true;
    sandbox.add_storage(ctx(), &bb).await?;
    let mut formats = vec![];
    for (integrity, id, serial) in [
        (false, "scratch", "veil-scratch"),
        (true, "integ", "veil-integ"),
    ] {
        let mut r = veil_shim::storage::scratch::add_request(integrity);
        r.storage_id = id.into();
        r.locator = serial.into();
        let t = std::time::Instant::now();
        sandbox
            .add_storage(ctx(), &r)
            .await
            .with_context(|| format!("scratch disk {id}; console:\n{}", vm.console()))?;
        formats.push(t.elapsed());
    }
    sandbox
        .add_storage(ctx(), &storage("plain", "veil-plain"))
        .await
        .with_context(|| format!("plain disk; console:\n{}", vm.console()))?;

    // dd's own timing line is compiled out of Debian's busybox: time with
    // the guest's uptime around each dd.
    let dd = |d: &str| {
        format!(
            "now() {{ cut -d' ' -f1 /proc/uptime; }}; \
             a=$(now); dd if=/dev/zero of={d}/f bs=1M count={mib} oflag=direct conv=fsync 2>/dev/null || exit 1; b=$(now); \
             dd if={d}/f of=/dev/null bs=1M iflag=direct 2>/dev/null || exit 1; c=$(now); rm {d}/f; \
             echo W $a $b; echo R $b $c"
        )
    };
    let mut res: [[Vec<f64>; 2]; 3] = Default::default();
    for i in 0..n {
        for (k, d) in ["/enc", "/integ", "/plain"].iter().enumerate() {
            let out = run(&vm, &containers, &format!("dd-{i}-{k}"), &dd(d)).await?;
            let (Some(w), Some(r)) = (timed(&out, "W "), timed(&out, "R ")) else {
                bail!("cannot parse the timings:\n{out}");
            };
            res[k][0].push(mib as f64 / w);
            res[k][1].push(mib as f64 / r);
        }
    }
    println!(
        "scratch disk ({DISK_MIB} MiB) format and mount (AddStorage, once): encrypted {} ms, with integrity {} ms",
        formats[0].as_millis(),
        formats[1].as_millis()
    );
    println!(
        "scratch disk throughput, {mib} MiB dd with O_DIRECT, median of {n} runs, one VM ({:?}):",
        vm.accel
    );
    let [enc_r, integ_r, plain_r] = res;
    for (op, j) in [("write", 0), ("read", 1)] {
        let e = median(enc_r[j].clone());
        let i = median(integ_r[j].clone());
        let p = median(plain_r[j].clone());
        println!(
            "  {op:<5}  encrypted (LUKS2 aes-xts-plain64) {e:>8.1} MiB/s ({:.2})   with integrity {i:>8.1} MiB/s ({:.2})   unencrypted {p:>8.1} MiB/s",
            e / p,
            i / p
        );
    }
    // The integrity tags live in a memfd: shared memory in the guest.
    let mem = run(
        &vm,
        &containers,
        "meminfo",
        "grep -E '^(Shmem|MemAvailable):' /proc/meminfo",
    )
    .await?;
    println!("guest memory after the runs (the tags are Shmem):\n{mem}");
    let written = std::fs::read(&enc)?;
    if !written.starts_with(b"LUKS\xba\xbe") {
        bail!("the scratch disk has no LUKS2 header");
    }
    Ok(())
}
