//! veil's first-run demo: the whole confidential path of a pod.
//!
//! A private containerd runs a busybox container in a `veil-sim` microVM
//! whose handler names a key broker (the real `veil-kbs` on 127.0.0.1 with a
//! simulated TEE CA): the VM attests, the broker releases the disk key and
//! the image policy (its audit lines are printed), the container writes a
//! secret to its root filesystem and to an emptyDir — both on the pod's
//! LUKS2-encrypted scratch disk — and reads it back, and the host-side
//! scratch file is searched: a LUKS2 header, no secret. Everything it started
//! is stopped on exit. Used by `ci/demo.sh` after set-up and the artefact
//! build.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use veil_tests::{
    oci,
    storage::{find, random, scratch_file, Confidential, LUKS_MAGIC, NS},
};

fn main() -> Result<()> {
    println!("starting a private containerd (veil runtime) and a key broker (veil-kbs, simulated TEE CA)");
    let env = Confidential::new()?;
    let root_hash = env.busybox_root_hash()?;
    println!("busybox root image: dm-verity root hash {root_hash} (released as the image policy)");
    env.resources(&root_hash)?;
    let reference = env.register("demo-pod", |_| {})?;
    println!("reference measurement of the veil-sim pod (veil measure --mode sim): {reference}");
    let broker = env.start_broker("demo-pod")?;
    let result = run(&env, &broker);
    if result.is_err() {
        eprintln!("containerd log:\n{}", env.c.log_text());
    }
    result
}

fn run(env: &Confidential, broker: &veil_tests::kbs::Broker) -> Result<()> {
    let c = &env.c;
    let id = "demo";
    let vol = env
        .work
        .path()
        .join("pod/volumes/kubernetes.io~empty-dir/data");
    std::fs::create_dir_all(&vol)?;
    let secret = format!("veil-demo-secret-{}", hex::encode(random(8)?));
    let script = format!(
        "echo {secret} > /root-secret && echo {secret} > /data/secret && sync && \
         echo \"read back: $(cat /root-secret) (root fs), $(cat /data/secret) (emptyDir)\""
    );
    // The pod's policy (docs/policy.md): this container, and this one exec;
    // any other exec from the host is refused.
    let policy = format!(
        "version = 1\n[[container]]\nname = \"demo\"\nargs = [\"sleep\", \"1000\"]\n\
         env_names = [\"PATH\", \"HOSTNAME\", \"TERM\"]\nmounts = [\"/data\"]\nstdin = true\n\
         [[container.exec]]\nargs = [\"sh\", \"-c\", {}]\nstdin = true\n",
        serde_json::to_string(&script)?
    );
    let mut args = env.run_args("veil-sim", oci::BUSYBOX_IMAGE);
    args.extend([
        "--annotation".into(),
        format!("io.veil.policy={policy}"),
        "-d".into(),
        "--mount".into(),
        format!("type=bind,src={},dst=/data,options=rbind:rw", vol.display()),
        oci::BUSYBOX_IMAGE.into(),
        id.into(),
        "sleep".into(),
        "1000".into(),
    ]);
    println!("$ ctr run -d --runtime io.containerd.veil.v2 … --mount …/volumes/kubernetes.io~empty-dir/data:/data busybox demo sleep 1000");
    let t = Instant::now();
    let out = c.ctr(NS).args(&args).output()?;
    if !out.status.success() {
        bail!(
            "ctr run failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    println!(
        "pod VM booted, attested and unlocked its scratch disk in {:.1} s; the broker's audit log:",
        t.elapsed().as_secs_f64()
    );
    for e in broker.audit_events() {
        let resource = e["resource"]
            .as_str()
            .map(|r| format!(" {r}"))
            .unwrap_or_default();
        println!(
            "  {}{resource}: tee {}, measurement {}",
            e["outcome"].as_str().unwrap_or("?"),
            e["tee"].as_str().unwrap_or("?"),
            e["measurement"].as_str().unwrap_or("?"),
        );
    }
    println!("$ ctr task exec demo sh -c 'echo SECRET > /root-secret; echo SECRET > /data/secret; sync; cat …'");
    let out = c.ctr_ok(
        NS,
        &["task", "exec", "--exec-id", "w", id, "sh", "-c", &script],
    )?;
    print!("  {}", String::from_utf8_lossy(&out.stdout));
    println!("$ ctr task exec demo cat /data/secret   (not in the pod's policy)");
    let denied = c
        .ctr(NS)
        .args(["task", "exec", "--exec-id", "x", id, "cat", "/data/secret"])
        .output()?;
    if denied.status.success() {
        bail!("the host read the secret through exec: the policy was not enforced");
    }
    println!(
        "  refused: {}",
        String::from_utf8_lossy(&denied.stderr).trim()
    );
    let scratch = scratch_file(c, id);
    let head = std::fs::read(&scratch).with_context(|| format!("reading {}", scratch.display()))?;
    let luks = head.starts_with(LUKS_MAGIC);
    let leaked = find(&head, secret.as_bytes()).is_some();
    println!(
        "host side {}: {} bytes (sparse), LUKS2 header: {}, secret found: {}; host emptyDir directory empty: {}",
        scratch.display(),
        head.len(),
        if luks { "yes" } else { "NO" },
        if leaked { "YES" } else { "no" },
        std::fs::read_dir(&vol)?.next().is_none(),
    );
    let _ = c.kill_and_remove(NS, id);
    if !luks || leaked {
        bail!("the host-side scratch file is not ciphertext only");
    }
    c.wait_clean(&[id])?;
    println!("pod stopped; nothing left behind");
    Ok(())
}
