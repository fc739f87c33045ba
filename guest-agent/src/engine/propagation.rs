//! Mount propagation between a pod's containers. A bind mount asked for with
//! `rshared` or `rslave` propagation (Kubernetes `Bidirectional`,
//! `HostToContainer`) only receives or sends mounts if its source, in the
//! agent's mount namespace, is a shared mount: the containers' copies then
//! join its peer group (`rshared`) or follow it (`rslave`), as they do on a
//! node whose volume directories are shared mounts. The agent's own mounts
//! are private otherwise, so [`ensure_shared`] makes such a source a shared
//! mount point of its own (a bind onto itself) the first time it is used.
//! Mounts under it go away with the storage they are on (detached with it).

use std::{fs, io, path::Path};

use nix::mount::{mount, MsFlags};

/// Whether `path` is a mount point in this mount namespace and, if so,
/// whether it is shared.
pub(super) fn mount_state(path: &Path) -> io::Result<Option<bool>> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let want = path.to_string_lossy().replace(' ', "\\040");
    // The last entry for a mount point is the one on top.
    let mut state = None;
    for l in info.lines() {
        let mut fields = l.split(' ');
        let Some(mp) = fields.nth(4) else { continue };
        if mp == want {
            let optional = fields.skip(1).take_while(|f| *f != "-");
            state = Some(optional.into_iter().any(|f| f.starts_with("shared:")));
        }
    }
    Ok(state)
}

/// Makes the mount holding `path` private, on its own (not the mounts
/// below it): a mount under a shared parent cannot be moved.
pub(super) fn make_parent_private(path: &Path) -> io::Result<()> {
    let mut p = path.parent();
    while let Some(dir) = p {
        if mount_state(dir)?.is_some() {
            return mount(
                None::<&str>,
                dir,
                None::<&str>,
                MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .map_err(io::Error::from);
        }
        p = dir.parent();
    }
    Ok(())
}

/// Makes `path` (a directory or file in the agent's mount namespace) a
/// shared mount point, binding it onto itself when it is not a mount point.
pub fn ensure_shared(path: &Path) -> io::Result<()> {
    match mount_state(path)? {
        Some(true) => return Ok(()),
        Some(false) => {}
        None => mount(
            Some(path),
            path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )?,
    }
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_of_the_mount_table_is_a_mount_point() {
        assert!(mount_state(Path::new("/")).unwrap().is_some());
        assert!(mount_state(Path::new("/no/such/dir")).unwrap().is_none());
    }
}
