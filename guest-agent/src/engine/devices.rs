//! The guest's device nodes, for a container allowed every device (a
//! privileged container): what `/dev` of the agent (the guest's devtmpfs)
//! holds, as [`DevicePlan`]s the container process creates in its own `/dev`.
//! The host's device list means nothing in the guest; the guest's does.

use std::{
    fs,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use super::wire::DevicePlan;

/// Directories of `/dev` that are filesystems of their own or per-container
/// (the container gets its own devpts, shm and mqueue).
const SKIPPED_DIRS: &[&str] = &["pts", "shm", "mqueue", "hugepages"];
/// Nodes the container's `/dev` provides itself: `ptmx` is a link to its own
/// devpts instance's, `console` its terminal.
const SKIPPED_NODES: &[&str] = &["ptmx", "console"];
/// How deep below `/dev` to look (`/dev/net/tun`, `/dev/mapper/*`, ...).
const MAX_DEPTH: usize = 4;

/// Every character and block device below `dev` (normally `/dev`), as the
/// same path below the container's `/dev`, with its mode and owner.
pub fn guest_devices(dev: &Path) -> Vec<DevicePlan> {
    let mut out = Vec::new();
    walk(dev, Path::new("/dev"), 0, &mut out);
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

fn walk(dir: &Path, inside: &Path, depth: usize, out: &mut Vec<DevicePlan>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(n) = name.to_str() else { continue };
        let Ok(meta) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            if depth < MAX_DEPTH && !(depth == 0 && SKIPPED_DIRS.contains(&n)) {
                walk(&e.path(), &inside.join(n), depth + 1, out);
            }
            continue;
        }
        if depth == 0 && SKIPPED_NODES.contains(&n) {
            continue;
        }
        if ft.is_char_device() || ft.is_block_device() {
            let rdev = meta.rdev();
            out.push(DevicePlan {
                path: PathBuf::from(inside).join(n),
                mode: meta.mode(),
                major: nix::sys::stat::major(rdev),
                minor: nix::sys::stat::minor(rdev),
                uid: meta.uid(),
                gid: meta.gid(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_the_device_nodes_of_a_dev_tree() {
        // /dev of whatever runs the test: /dev/null is always there, a
        // character device 1:3; pts is never listed.
        let devs = guest_devices(Path::new("/dev"));
        let null = devs
            .iter()
            .find(|d| d.path == Path::new("/dev/null"))
            .expect("/dev/null listed");
        assert_eq!((null.major, null.minor), (1, 3));
        assert_eq!(null.mode & libc::S_IFMT, libc::S_IFCHR);
        assert!(devs.iter().all(|d| !d.path.starts_with("/dev/pts")));
        assert!(devs.iter().all(|d| d.path != Path::new("/dev/ptmx")));
    }
}
