//! Each container's root filesystem: the image's unpacked layers (shared by
//! every image and container that uses them) as the read-only lower layers
//! of an overlayfs, with the container's own upper layer in its bundle, so
//! containers never write into a shared layer. Where overlayfs is
//! unavailable (old kernels, odd filesystems, a lowerdir list too long for
//! one mount), a private merged copy.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::image::unpack::{copy_meta, is_opaque, is_whiteout, remove_any};

/// An image's filesystem: its unpacked layers, bottom first, in overlayfs's
/// format (whiteouts are 0:0 character devices, opaque directories carry
/// `trusted.overlay.opaque`). A plain directory is a one-layer rootfs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rootfs {
    pub layers: Vec<PathBuf>,
}

impl From<PathBuf> for Rootfs {
    fn from(dir: PathBuf) -> Self {
        Self { layers: vec![dir] }
    }
}

impl From<&str> for Rootfs {
    fn from(dir: &str) -> Self {
        PathBuf::from(dir).into()
    }
}

impl Rootfs {
    /// Where `rel` (relative, no `..`) is in the merged view: the topmost
    /// layer that has it, unless a layer above hides it.
    pub fn lookup(&self, rel: impl AsRef<Path>) -> Option<PathBuf> {
        let rel = rel.as_ref();
        for layer in self.layers.iter().rev() {
            let mut cur = layer.clone();
            let parts: Vec<_> = rel.components().collect();
            for (i, part) in parts.iter().enumerate() {
                cur.push(part);
                let Ok(meta) = fs::symlink_metadata(&cur) else { break };
                if is_whiteout(&meta) {
                    return None;
                }
                if i + 1 == parts.len() {
                    return Some(cur);
                }
                // An opaque directory hides what the layers below have in it.
                if meta.is_dir() && is_opaque(&cur) {
                    let rest: PathBuf = parts[i + 1..].iter().collect();
                    return Some(cur.join(rest)).filter(|p| fs::symlink_metadata(p).is_ok());
                }
            }
        }
        None
    }
}

/// How a container's rootfs was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsKind {
    Overlay,
    Copy,
}

pub fn merged(bundle: &Path) -> PathBuf {
    bundle.join("rootfs")
}

/// The mount's options must fit in one page.
const MAX_OVERLAY_OPTIONS: usize = 4000;

/// Mounts (or copies) `rootfs` as `bundle/rootfs`.
pub fn prepare(rootfs: &Rootfs, bundle: &Path) -> std::io::Result<RootfsKind> {
    let (upper, work, target) = (bundle.join("upper"), bundle.join("work"), merged(bundle));
    for d in [&upper, &work, &target] {
        fs::create_dir_all(d)?;
    }
    // overlayfs separates options with ',' and lowerdirs with ':'.
    let lowers: Vec<&Path> = rootfs.layers.iter().rev().map(PathBuf::as_path).collect();
    let expressible = !lowers.is_empty()
        && lowers
            .iter()
            .chain([&upper.as_path(), &work.as_path()])
            .all(|p| p.to_str().is_some_and(|s| !s.contains([',', ':'])));
    if expressible {
        let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let options =
            format!("lowerdir={},upperdir={},workdir={}", lowerdir.join(":"), upper.display(), work.display());
        if options.len() <= MAX_OVERLAY_OPTIONS {
            match mount(Some("overlay"), &target, Some("overlay"), MsFlags::empty(), Some(options.as_str())) {
                Ok(()) => return Ok(RootfsKind::Overlay),
                Err(e) => tracing::warn!(error = %e, "overlayfs unavailable; copying the image layers instead"),
            }
        } else {
            tracing::warn!(layers = lowers.len(), "too many layers for one overlay mount; copying them instead");
        }
    }
    for layer in &rootfs.layers {
        merge_tree(layer, &target)?;
    }
    Ok(RootfsKind::Copy)
}

/// Unmounts the overlay if there is one; afterwards the bundle can be deleted.
pub fn release(bundle: &Path) -> std::io::Result<()> {
    match umount2(&merged(bundle), MntFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(std::io::Error::from(e)),
    }
}

/// After the container exited: unmounts its rootfs and deletes its writable
/// layer (and a merged copy), keeping the rest of the bundle (exit record,
/// log). Nothing is deleted through a mount that would not go.
pub fn discard(bundle: &Path) -> std::io::Result<()> {
    release(bundle)?;
    for dir in [merged(bundle), bundle.join("upper"), bundle.join("work")] {
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Copies one layer over `to` as overlayfs would show it: whiteouts delete,
/// opaque directories replace, everything else overwrites (the fallback).
/// Keeps symlinks, hard links (names of one file in the layer stay one file),
/// owners, modes, kept xattrs (file capabilities) and times.
fn merge_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    merge_dir(from, to, &mut std::collections::HashMap::new())
}

/// `links`: (dev, inode) of a multiply-linked file in the layer → its first copy.
fn merge_dir(
    from: &Path,
    to: &Path,
    links: &mut std::collections::HashMap<(u64, u64), PathBuf>,
) -> std::io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let meta = fs::symlink_metadata(&src)?;
        let ft = meta.file_type();
        if is_whiteout(&meta) {
            remove_any(&dst)?;
            continue;
        }
        let existing = fs::symlink_metadata(&dst).ok();
        if ft.is_dir() {
            if is_opaque(&src) || existing.as_ref().is_some_and(|m| !m.is_dir()) {
                remove_any(&dst)?;
            }
            fs::create_dir_all(&dst)?;
            merge_dir(&src, &dst, links)?;
        } else {
            if existing.is_some() {
                remove_any(&dst)?;
            }
            if ft.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
            } else if ft.is_file() {
                if meta.nlink() > 1 {
                    if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                        fs::hard_link(first, &dst)?;
                        continue;
                    }
                    links.insert((meta.dev(), meta.ino()), dst.clone());
                }
                fs::copy(&src, &dst)?;
            } else {
                continue; // fifos and sockets are not worth a fallback copy
            }
        }
        // A directory's times last: merging its contents moved them.
        copy_meta(&meta, &src, &dst)?;
    }
    Ok(())
}

/// Resolves `path` inside the container's root tree `root` as the container
/// would see it: symlinks are followed (at most 40) but never out of `root`
/// (an absolute target starts again at `root`, `..` stops at it). With
/// `create`, missing directories are made, owned by (uid, gid), mode 0755
/// (a WORKDIR the image lacks, as Podman makes it); without, a
/// missing component is an error. Returns the host path.
pub fn resolve_in(root: &Path, path: &str, create: Option<(u32, u32)>) -> Result<PathBuf, String> {
    let mut pending: Vec<std::ffi::OsString> =
        Path::new(path).components().rev().map(|c| c.as_os_str().to_os_string()).collect();
    let mut cur: Vec<std::ffi::OsString> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        match part.to_str() {
            Some("/") | Some(".") => continue,
            Some("..") => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        let host: PathBuf =
            std::iter::once(root.as_os_str().to_os_string()).chain(cur.iter().cloned()).chain([part.clone()]).collect();
        let shown =
            || format!("/{}", cur.iter().chain([&part]).map(|p| p.to_string_lossy()).collect::<Vec<_>>().join("/"));
        match fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(format!("{path}: too many levels of symbolic links"));
                }
                let target = fs::read_link(&host).map_err(|e| format!("{}: {e}", shown()))?;
                if target.is_absolute() {
                    cur.clear();
                }
                pending.extend(target.components().rev().map(|c| c.as_os_str().to_os_string()));
            }
            Ok(m) if m.is_dir() || pending.is_empty() => cur.push(part),
            Ok(_) => return Err(format!("{} is not a directory", shown())),
            Err(_) => match create {
                Some((uid, gid)) => {
                    fs::create_dir(&host).map_err(|e| format!("create {}: {e}", shown()))?;
                    std::os::unix::fs::lchown(&host, Some(uid), Some(gid))
                        .and_then(|()| fs::set_permissions(&host, fs::Permissions::from_mode(0o755)))
                        .map_err(|e| format!("create {}: {e}", shown()))?;
                    cur.push(part);
                }
                None => return Err(format!("{} does not exist", shown())),
            },
        }
    }
    Ok(std::iter::once(root.as_os_str().to_os_string()).chain(cur).collect())
}

/// Finds the program a container would exec: `argv0` as a path (when it has
/// a `/`) or through `path_env` (the container's PATH), inside `root`.
pub fn find_program(root: &Path, argv0: &str, path_env: &str) -> Result<PathBuf, String> {
    let executable = |p: &Path| fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0);
    if argv0.contains('/') {
        let p = resolve_in(root, argv0, None).map_err(|e| format!("{argv0}: not in the image ({e})"))?;
        return if executable(&p) { Ok(p) } else { Err(format!("{argv0} is not an executable file")) };
    }
    for dir in path_env.split(':').filter(|d| !d.is_empty()) {
        if let Ok(p) = resolve_in(root, &format!("{dir}/{argv0}"), None) {
            if executable(&p) {
                return Ok(p);
            }
        }
    }
    Err(format!("{argv0}: not found in the image's PATH ({path_env})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::unpack::set_xattr;

    /// base: etc/a, etc/b, opt/x/old; top: a whiteout of etc/a, an opaque opt/x with new.
    fn layers(dir: &Path) -> Rootfs {
        let (base, top) = (dir.join("base"), dir.join("top"));
        for d in [base.join("etc"), base.join("opt/x"), top.join("etc"), top.join("opt/x")] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(base.join("etc/a"), "a").unwrap();
        fs::write(base.join("etc/b"), "b").unwrap();
        fs::write(base.join("opt/x/old"), "old").unwrap();
        nix::sys::stat::mknod(
            &top.join("etc/a"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            nix::sys::stat::makedev(0, 0),
        )
        .unwrap();
        set_xattr(&top.join("opt/x"), crate::image::unpack::OPAQUE_XATTR, b"y").unwrap();
        fs::write(top.join("opt/x/new"), "new").unwrap();
        Rootfs { layers: vec![base, top] }
    }

    #[test]
    fn lookup_and_the_copy_fallback_see_what_overlayfs_shows() {
        assert!(nix::unistd::geteuid().is_root(), "mknod and trusted xattrs need root (CI runs tests as root)");
        let dir = tempfile::tempdir().unwrap();
        let rootfs = layers(dir.path());
        assert_eq!(rootfs.lookup("etc/a"), None);
        assert_eq!(rootfs.lookup("etc/b"), Some(dir.path().join("base/etc/b")));
        assert_eq!(rootfs.lookup("opt/x/old"), None);
        assert_eq!(rootfs.lookup("opt/x/new"), Some(dir.path().join("top/opt/x/new")));

        let merged = dir.path().join("merged");
        fs::create_dir(&merged).unwrap();
        for l in &rootfs.layers {
            merge_tree(l, &merged).unwrap();
        }
        assert!(!merged.join("etc/a").exists() && merged.join("etc/b").is_file());
        assert!(!merged.join("opt/x/old").exists() && merged.join("opt/x/new").is_file());
    }

    #[test]
    fn paths_resolve_inside_the_root_and_a_missing_workdir_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::write(root.join("usr/bin/app"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("usr/bin/app"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        // Escapes stay inside: an absolute target and a climb both land in root.
        std::os::unix::fs::symlink("/", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.join("up")).unwrap();
        assert_eq!(resolve_in(&root, "/bin/app", None).unwrap(), root.join("usr/bin/app"));
        assert_eq!(resolve_in(&root, "/abs/usr/bin/app", None).unwrap(), root.join("usr/bin/app"));
        assert_eq!(resolve_in(&root, "/up/up/usr", None).unwrap(), root.join("usr"));
        assert!(resolve_in(&root, "/srv/app", None).unwrap_err().contains("/srv does not exist"));
        assert_eq!(find_program(&root, "app", "/nowhere:/bin").unwrap(), root.join("usr/bin/app"));
        assert!(find_program(&root, "nope", "/bin").unwrap_err().contains("not found in the image's PATH"));

        let made = resolve_in(&root, "/up/srv/app/data", Some((1000, 1000))).unwrap();
        assert_eq!(made, root.join("srv/app/data"));
        let m = fs::metadata(&made).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1000, 0o755));
        assert!(resolve_in(&root, "/usr/bin/app/x", Some((0, 0)))
            .unwrap_err()
            .contains("/usr/bin/app is not a directory"));
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert!(resolve_in(&root, "/loop", None).unwrap_err().contains("too many levels"));
    }
}
