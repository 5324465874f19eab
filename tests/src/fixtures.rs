//! Container fixtures built from Debian's busybox-static.

use std::path::{Path, PathBuf};

pub const BUSYBOX: &str = "/bin/busybox";

/// A minimal rootfs: busybox and the applets the tests use.
pub fn busybox_rootfs(dir: &Path) -> std::io::Result<PathBuf> {
    let root = dir.join("rootfs");
    for d in ["bin", "dev", "proc", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox"))?;
    for applet in ["sh", "sleep", "echo", "cat", "true", "false"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    Ok(root)
}
