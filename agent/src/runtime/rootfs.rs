//! Each container's root filesystem: the image's unpacked rootfs as the
//! read-only lower layer of an overlayfs, with the container's own upper
//! layer in its bundle, so containers never write into a shared image. Where
//! overlayfs is unavailable (old kernels, odd filesystems), a private copy.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// How a container's rootfs was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsKind {
    Overlay,
    Copy,
}

pub fn merged(bundle: &Path) -> PathBuf {
    bundle.join("rootfs")
}

/// Mounts (or copies) `image_rootfs` as `bundle/rootfs`.
pub fn prepare(image_rootfs: &Path, bundle: &Path) -> std::io::Result<RootfsKind> {
    let (upper, work, target) = (bundle.join("upper"), bundle.join("work"), merged(bundle));
    for d in [&upper, &work, &target] {
        fs::create_dir_all(d)?;
    }
    // overlayfs separates options with ',' and lowerdirs with ':'.
    let paths = [image_rootfs, &upper, &work];
    let expressible = paths.iter().all(|p| p.to_str().is_some_and(|s| !s.contains([',', ':'])));
    if expressible {
        let options =
            format!("lowerdir={},upperdir={},workdir={}", image_rootfs.display(), upper.display(), work.display());
        match mount(Some("overlay"), &target, Some("overlay"), MsFlags::empty(), Some(options.as_str())) {
            Ok(()) => return Ok(RootfsKind::Overlay),
            Err(e) => tracing::warn!(error = %e, "overlayfs unavailable; copying the image rootfs instead"),
        }
    }
    copy_tree(image_rootfs, &target)?;
    Ok(RootfsKind::Copy)
}

/// Unmounts the overlay if there is one; afterwards the bundle can be deleted.
pub fn release(bundle: &Path) -> std::io::Result<()> {
    match umount2(&merged(bundle), MntFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(std::io::Error::from(e)),
    }
}

/// Copies a tree preserving symlinks, modes and ownership (the fallback).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let meta = fs::symlink_metadata(&src)?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
        } else if ft.is_dir() {
            fs::create_dir_all(&dst)?;
            copy_tree(&src, &dst)?;
        } else if ft.is_file() {
            fs::copy(&src, &dst)?;
        } else {
            continue; // fifos and sockets are not worth a fallback copy
        }
        std::os::unix::fs::lchown(&dst, Some(meta.uid()), Some(meta.gid()))?;
        if !ft.is_symlink() {
            fs::set_permissions(&dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        }
    }
    Ok(())
}
