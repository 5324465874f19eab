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

use crate::image::unpack::{is_opaque, is_whiteout, remove_any};

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
/// Preserves symlinks, modes and ownership.
fn merge_tree(from: &Path, to: &Path) -> std::io::Result<()> {
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
            merge_tree(&src, &dst)?;
        } else {
            if existing.is_some() {
                remove_any(&dst)?;
            }
            if ft.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
            } else if ft.is_file() {
                fs::copy(&src, &dst)?;
            } else {
                continue; // fifos and sockets are not worth a fallback copy
            }
        }
        std::os::unix::fs::lchown(&dst, Some(meta.uid()), Some(meta.gid()))?;
        if !ft.is_symlink() {
            fs::set_permissions(&dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        }
    }
    Ok(())
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
}
