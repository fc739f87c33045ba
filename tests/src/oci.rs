//! OCI image archives for tests, built offline: a busybox image (from
//! Debian's `busybox-static`, see [`crate::rootfs`]) and a tiny pause image
//! (a static C program that waits for signals), each written as an OCI image
//! layout tarball that `ctr images import` accepts.
//!
//! Layers are plain (uncompressed) tars; the image name is carried in the
//! index's `io.containerd.image.name` annotation.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Name of the busybox test image.
pub const BUSYBOX_IMAGE: &str = "docker.io/veil-test/busybox:1";
/// Name of the pause image (configured as the CRI `sandbox_image`).
pub const PAUSE_IMAGE: &str = "docker.io/veil-test/pause:1";

/// What goes in an image.
pub struct ImageSpec<'a> {
    /// Image name (`io.containerd.image.name`).
    pub name: &'a str,
    /// The root filesystem tree.
    pub rootfs: &'a Path,
    /// Default command.
    pub cmd: &'a [&'a str],
}

fn write_blob(blobs: &Path, bytes: &[u8]) -> Result<(String, usize)> {
    let digest = hex::encode(Sha256::digest(bytes));
    fs::write(blobs.join(&digest), bytes)?;
    Ok((format!("sha256:{digest}"), bytes.len()))
}

/// Writes the OCI archive of `spec` to `out` (a tar of an OCI image layout).
pub fn build_archive(spec: &ImageSpec<'_>, work: &Path, out: &Path) -> Result<()> {
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let layer_tar = work.join("layer.tar");
    let st = Command::new("tar")
        .args([
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--sort=name",
            "-C",
        ])
        .arg(spec.rootfs)
        .arg("-cf")
        .arg(&layer_tar)
        .arg(".")
        .status()
        .context("running tar")?;
    if !st.success() {
        bail!("tar of {} failed", spec.rootfs.display());
    }
    let layer = fs::read(&layer_tar)?;
    let (layer_digest, layer_size) = write_blob(&blobs, &layer)?;
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": spec.cmd,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = write_blob(&blobs, &serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer_size,
        }],
    });
    let (manifest_digest, manifest_size) = write_blob(&blobs, &serde_json::to_vec(&manifest)?)?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": spec.name,
                "org.opencontainers.image.ref.name": spec.name.rsplit(':').next().unwrap_or("latest"),
            },
        }],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let st = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(&layout)
        .arg("-cf")
        .arg(out)
        .args(["oci-layout", "index.json", "blobs"])
        .status()?;
    if !st.success() {
        bail!("tar of the OCI layout failed");
    }
    Ok(())
}

/// The busybox image archive, built in `dir`.
pub fn busybox_archive(dir: &Path) -> Result<PathBuf> {
    Ok(busybox_archive_with(dir, BUSYBOX_IMAGE, &[])?.0)
}

/// A busybox image named `name` with extra `files` (path in the image,
/// contents), built in `dir` (its own subdirectories, so several variants
/// can share `dir`). Returns the archive and the root filesystem tree.
pub fn busybox_archive_with(
    dir: &Path,
    name: &str,
    files: &[(&str, &[u8])],
) -> Result<(PathBuf, PathBuf)> {
    let tag = hex::encode(&Sha256::digest(name.as_bytes())[..6]);
    let tree = dir.join(format!("busybox-rootfs-{tag}"));
    crate::rootfs::busybox_rootfs(&tree)?;
    for (path, data) in files {
        let p = tree.join(path.trim_start_matches('/'));
        fs::create_dir_all(p.parent().context("file path has no parent")?)?;
        fs::write(p, data)?;
    }
    let out = dir.join(format!("busybox-{tag}.oci.tar"));
    let work = dir.join(format!("busybox-oci-{tag}"));
    build_archive(
        &ImageSpec {
            name,
            rootfs: &tree,
            cmd: &["sh"],
        },
        &work,
        &out,
    )?;
    Ok((out, tree))
}

/// The pause image archive, built in `dir` (compiles `support/pause.c` with
/// `gcc -static`).
pub fn pause_archive(dir: &Path) -> Result<PathBuf> {
    let tree = dir.join("pause-rootfs");
    fs::create_dir_all(&tree)?;
    let src = crate::workspace_root().join("tests/support/pause.c");
    let st = Command::new("gcc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(tree.join("pause"))
        .arg(&src)
        .status()
        .context("running gcc (install build-essential)")?;
    if !st.success() {
        bail!("gcc -static {} failed", src.display());
    }
    for d in ["proc", "sys", "dev", "etc", "tmp"] {
        fs::create_dir_all(tree.join(d))?;
    }
    let out = dir.join("pause.oci.tar");
    build_archive(
        &ImageSpec {
            name: PAUSE_IMAGE,
            rootfs: &tree,
            cmd: &["/pause"],
        },
        &dir.join("pause-oci"),
        &out,
    )?;
    Ok(out)
}
