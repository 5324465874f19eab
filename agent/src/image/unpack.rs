//! Applies image layers (tar streams) onto a directory, refusing anything
//! that could write outside it. Two targets: `Target::Merged` applies a layer
//! onto the layers below it in one tree (tarball extraction, tests);
//! `Target::Layer` unpacks a layer into a directory of its own, in
//! overlayfs's format, so images that share a layer share its unpacked files:
//! a whiteout becomes a 0:0 character device, an opaque marker the
//! `trusted.overlay.opaque` xattr, and a hard link to a file of a lower layer
//! a copy of it (the lower layers are given, top first, for that).
//!
//! Rules: entry paths are normalised and `..` is refused; extraction never
//! follows a symlink (each parent component is checked with lstat, files are
//! opened with O_NOFOLLOW); hard-link sources must resolve inside the rootfs
//! the same way; device nodes are skipped (a container gets its devices from
//! its spec); OCI whiteouts (`.wh.NAME`) delete from lower layers and opaque
//! markers (`.wh..wh..opq`) hide a directory's lower contents.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::ImageError;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
    pub skipped_devices: u64,
}

/// `path` inside the layer as a clean relative path; `None` for the root itself.
fn normalise(raw: &Path) -> Result<Option<PathBuf>, ImageError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                return Err(ImageError::UnsafeLayer(format!("entry {} climbs out with '..'", raw.display())));
            }
            Component::Prefix(_) => {
                return Err(ImageError::UnsafeLayer(format!("entry {} has a prefix", raw.display())))
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Makes sure every parent of `rel` inside `root` is a real directory,
/// creating missing ones; refuses to pass through a symlink.
fn ensure_parents(root: &Path, rel: &Path) -> Result<(), ImageError> {
    let mut cur = root.to_path_buf();
    let Some(parent) = rel.parent() else { return Ok(()) };
    for part in parent.components() {
        cur.push(part);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(ImageError::UnsafeLayer(format!(
                    "{} goes through the symlink {}",
                    rel.display(),
                    cur.display()
                )));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                fs::remove_file(&cur).map_err(ImageError::io(format!("replace {}", cur.display())))?;
                fs::create_dir(&cur).map_err(ImageError::io(format!("mkdir {}", cur.display())))?;
            }
            Err(_) => fs::create_dir(&cur).map_err(ImageError::io(format!("mkdir {}", cur.display())))?,
        }
    }
    Ok(())
}

/// Removes whatever is at `path` (a tree, a file, a link); nothing there is fine.
pub fn remove_any(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Where a layer's files go.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// Onto a tree holding the layers below.
    Merged,
    /// Into a directory of its own; `lowers` are the unpacked layers below, top first.
    Layer { lowers: &'a [PathBuf] },
}

/// overlayfs marks a directory whose lower contents are hidden with this xattr.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Sets an extended attribute on `path` itself (never through a symlink).
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let n = std::ffi::CString::new(name)?;
    // SAFETY: both strings are NUL-terminated and live across the call; the value is a valid slice.
    let r = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether `path` carries overlayfs's opaque marker.
pub fn is_opaque(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let (Ok(p), Ok(n)) = (std::ffi::CString::new(path.as_os_str().as_bytes()), std::ffi::CString::new(OPAQUE_XATTR))
    else {
        return false;
    };
    let mut buf = [0u8; 4];
    // SAFETY: NUL-terminated strings and a buffer of the length given.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    r == 1 && buf[0] == b'y'
}

/// Whether `meta` is overlayfs's whiteout: a 0:0 character device.
pub fn is_whiteout(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// `rel` in the first of `lowers` that has it, reached without passing
/// through a symlink (nothing outside the layers is ever read).
fn find_in_lowers(lowers: &[PathBuf], rel: &Path) -> Option<PathBuf> {
    'layer: for lower in lowers {
        let mut cur = lower.clone();
        let parts: Vec<_> = rel.components().collect();
        for (i, part) in parts.iter().enumerate() {
            cur.push(part);
            match fs::symlink_metadata(&cur) {
                Ok(m) if is_whiteout(&m) => return None,
                Ok(m) if i + 1 == parts.len() => return (!m.is_dir() && !m.file_type().is_symlink()).then_some(cur),
                Ok(m) if m.is_dir() => {}
                _ => continue 'layer,
            }
        }
    }
    None
}

/// Applies one uncompressed layer onto `root` (see `Target`).
pub fn apply_layer(reader: impl Read, root: &Path) -> Result<LayerStats, ImageError> {
    unpack(reader, root, Target::Merged, &|_| Ok(()))
}

/// How often (bytes written) an unpack asks its guard whether it may go on.
const GUARD_EVERY: u64 = 4 << 20;

/// Unpacks one uncompressed layer into `root` for `target`. `guard` is asked,
/// with the bytes written so far, every few MiB; its error stops the unpack
/// (the disk is about to be full: see `space`).
pub fn unpack(
    reader: impl Read,
    root: &Path,
    target: Target<'_>,
    guard: &dyn Fn(u64) -> Result<(), ImageError>,
) -> Result<LayerStats, ImageError> {
    let mut archive = tar::Archive::new(reader);
    let mut stats = LayerStats::default();
    // Paths this layer created: an opaque marker hides lower layers only.
    let mut created: HashSet<PathBuf> = HashSet::new();
    let entries = archive.entries().map_err(ImageError::io("read layer"))?;
    for entry in entries {
        let mut entry = entry.map_err(ImageError::io("read layer entry"))?;
        let raw = entry.path().map_err(ImageError::io("read entry path"))?.into_owned();
        let Some(rel) = normalise(&raw)? else { continue };
        stats.entries += 1;
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let kind = entry.header().entry_type();

        if name == OPAQUE {
            stats.whiteouts += 1;
            let dir = rel.parent().unwrap_or(Path::new(""));
            ensure_parents(root, &rel)?;
            if let Target::Layer { .. } = target {
                set_xattr(&root.join(dir), OPAQUE_XATTR, b"y")
                    .map_err(ImageError::io(format!("mark {} opaque", dir.display())))?;
                continue;
            }
            if let Ok(children) = fs::read_dir(root.join(dir)) {
                for child in children.flatten() {
                    if !created.contains(&dir.join(child.file_name())) {
                        remove_any(&child.path()).map_err(ImageError::io(format!("opaque {}", dir.display())))?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            stats.whiteouts += 1;
            ensure_parents(root, &rel)?;
            let hidden = rel.with_file_name(hidden);
            normalise(&hidden)?;
            remove_any(&root.join(&hidden)).map_err(ImageError::io(format!("whiteout {}", hidden.display())))?;
            if let Target::Layer { .. } = target {
                let dev = nix::sys::stat::makedev(0, 0);
                nix::sys::stat::mknod(
                    &root.join(&hidden),
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::empty(),
                    dev,
                )
                .map_err(|e| ImageError::io(format!("whiteout {}", hidden.display()))(e.into()))?;
                created.insert(hidden);
            }
            continue;
        }

        ensure_parents(root, &rel)?;
        let dest = root.join(&rel);
        let existing = fs::symlink_metadata(&dest).ok();
        let keep_dir = kind.is_dir() && existing.as_ref().is_some_and(|m| m.is_dir());
        if existing.is_some() && !keep_dir {
            remove_any(&dest).map_err(ImageError::io(format!("replace {}", dest.display())))?;
        }
        let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = (entry.header().uid().unwrap_or(0), entry.header().gid().unwrap_or(0));

        match kind {
            tar::EntryType::Directory => {
                if !keep_dir {
                    fs::create_dir(&dest).map_err(ImageError::io(format!("mkdir {}", dest.display())))?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dest)
                    .map_err(ImageError::io(format!("create {}", dest.display())))?;
                copy_guarded(&mut entry, &mut f, &mut stats.bytes, guard)
                    .map_err(|e| e.within(&format!("write {}", dest.display())))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(ImageError::io("read symlink target"))?
                    .ok_or_else(|| ImageError::UnsafeLayer(format!("symlink {} has no target", rel.display())))?;
                // Any target is fine: it is only ever resolved inside the container.
                std::os::unix::fs::symlink(&target, &dest)
                    .map_err(ImageError::io(format!("symlink {}", dest.display())))?;
            }
            tar::EntryType::Link => {
                let raw_src = entry
                    .link_name()
                    .map_err(ImageError::io("read hard link source"))?
                    .ok_or_else(|| ImageError::UnsafeLayer(format!("hard link {} has no source", rel.display())))?
                    .into_owned();
                let src_rel = normalise(&raw_src)?
                    .ok_or_else(|| ImageError::UnsafeLayer(format!("hard link {} to the root", rel.display())))?;
                ensure_parents(root, &src_rel)?;
                let src = root.join(&src_rel);
                let lower = match target {
                    Target::Layer { lowers } if fs::symlink_metadata(&src).is_err() => find_in_lowers(lowers, &src_rel),
                    _ => None,
                };
                if let Some(lower) = lower {
                    // The source is in a layer below: this layer gets its own copy.
                    stats.bytes +=
                        fs::copy(&lower, &dest).map_err(ImageError::io(format!("copy {}", dest.display())))?;
                    let m = fs::metadata(&lower).map_err(ImageError::io(format!("stat {}", lower.display())))?;
                    std::os::unix::fs::lchown(&dest, Some(m.uid()), Some(m.gid()))
                        .map_err(ImageError::io(format!("chown {}", dest.display())))?;
                    created.insert(rel);
                    continue;
                }
                match fs::symlink_metadata(&src) {
                    Ok(m) if !m.is_dir() => {}
                    _ => {
                        return Err(ImageError::UnsafeLayer(format!(
                            "hard link {} -> {}: source is missing or a directory",
                            rel.display(),
                            raw_src.display()
                        )))
                    }
                }
                // link(2) does not follow a symlink source: the new name shares the link itself.
                fs::hard_link(&src, &dest).map_err(ImageError::io(format!("link {}", dest.display())))?;
                created.insert(rel);
                continue;
            }
            tar::EntryType::Fifo => {
                nix::unistd::mkfifo(&dest, nix::sys::stat::Mode::from_bits_truncate(mode))
                    .map_err(|e| ImageError::io(format!("mkfifo {}", dest.display()))(e.into()))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                stats.skipped_devices += 1;
                continue;
            }
            _ => continue, // pax/GNU metadata entries are consumed by the tar reader
        }
        std::os::unix::fs::lchown(&dest, Some(uid as u32), Some(gid as u32))
            .map_err(ImageError::io(format!("chown {}", dest.display())))?;
        if kind != tar::EntryType::Symlink {
            fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
                .map_err(ImageError::io(format!("chmod {}", dest.display())))?;
        }
        created.insert(rel);
    }
    Ok(stats)
}

/// Copies a file's bytes, asking `guard` each time the layer's total crosses
/// another `GUARD_EVERY`.
fn copy_guarded(
    from: &mut impl Read,
    to: &mut fs::File,
    total: &mut u64,
    guard: &dyn Fn(u64) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    use std::io::Write;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ImageError::Io { context: "read layer".into(), source: e }),
        };
        to.write_all(&buf[..n]).map_err(|e| ImageError::Io { context: String::new(), source: e })?;
        let before = *total;
        *total += n as u64;
        if before / GUARD_EVERY != *total / GUARD_EVERY {
            guard(*total)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer from (path, kind, data-or-link-target) triples, written raw so
    /// that hostile paths the `tar` builder would reject can be expressed.
    fn layer(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            {
                let name = &mut h.as_gnu_mut().unwrap().name;
                name[..path.len()].copy_from_slice(path.as_bytes());
            }
            h.set_entry_type(*kind);
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            h.set_uid(0);
            h.set_gid(0);
            let body: &[u8] = if matches!(kind, tar::EntryType::Regular) { data.as_bytes() } else { b"" };
            if matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
                h.set_link_name(data).unwrap();
            }
            h.set_size(body.len() as u64);
            h.set_cksum();
            b.append(&h, body).unwrap();
        }
        b.into_inner().unwrap()
    }

    use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as S};

    #[test]
    fn layers_stack_with_whiteouts_and_opaque_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        apply_layer(
            &layer(&[
                ("etc/", D, ""),
                ("etc/a", F, "1"),
                ("etc/b", F, "2"),
                ("opt/x/old", F, "o"),
                ("bin/sh", F, "sh"),
            ])[..],
            root,
        )
        .unwrap();
        let stats = apply_layer(
            &layer(&[
                ("etc/.wh.a", F, ""),
                ("opt/x/.wh..wh..opq", F, ""),
                ("opt/x/new", F, "n"),
                ("bin/ash", H, "bin/sh"),
                ("etc/b", F, "22"),
            ])[..],
            root,
        )
        .unwrap();
        assert_eq!(stats.whiteouts, 2);
        assert!(!root.join("etc/a").exists());
        assert_eq!(fs::read_to_string(root.join("etc/b")).unwrap(), "22");
        assert!(!root.join("opt/x/old").exists() && root.join("opt/x/new").exists());
        assert_eq!(fs::read_to_string(root.join("bin/ash")).unwrap(), "sh");
    }

    #[test]
    fn a_layer_of_its_own_keeps_whiteouts_opaque_dirs_and_lower_links_in_overlay_format() {
        let dir = tempfile::tempdir().unwrap();
        let (base, top) = (dir.path().join("base"), dir.path().join("top"));
        fs::create_dir_all(&base).unwrap();
        fs::create_dir_all(&top).unwrap();
        let lowers = [base.clone()];
        unpack(
            &layer(&[("etc/a", F, "1"), ("opt/x/old", F, "o"), ("bin/sh", F, "sh")])[..],
            &base,
            Target::Layer { lowers: &[] },
            &|_| Ok(()),
        )
        .unwrap();
        let stats = unpack(
            &layer(&[
                ("etc/.wh.a", F, ""),
                ("opt/x/.wh..wh..opq", F, ""),
                ("opt/x/new", F, "n"),
                ("bin/ash", H, "bin/sh"),
            ])[..],
            &top,
            Target::Layer { lowers: &lowers },
            &|_| Ok(()),
        )
        .unwrap();
        assert_eq!(stats.whiteouts, 2);
        // The lower layer is untouched; the upper one says what it hides.
        assert!(base.join("etc/a").is_file() && base.join("opt/x/old").is_file());
        assert!(is_whiteout(&fs::symlink_metadata(top.join("etc/a")).unwrap()));
        assert!(is_opaque(&top.join("opt/x")) && !is_opaque(&base.join("opt/x")));
        assert_eq!(fs::read_to_string(top.join("opt/x/new")).unwrap(), "n");
        // A link to a file below is a copy in this layer, not a link out of it.
        assert_eq!(fs::read_to_string(top.join("bin/ash")).unwrap(), "sh");
        assert_ne!(fs::metadata(top.join("bin/ash")).unwrap().ino(), fs::metadata(base.join("bin/sh")).unwrap().ino());
        // A link to something no layer has is still refused.
        let e = unpack(&layer(&[("x", H, "nowhere")])[..], &top, Target::Layer { lowers: &lowers }, &|_| Ok(()))
            .unwrap_err();
        assert!(matches!(e, ImageError::UnsafeLayer(_)), "{e}");
    }

    #[test]
    fn tar_slip_and_symlink_escapes_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        let cases: Vec<Vec<u8>> = vec![
            layer(&[("../escape", F, "x")]),
            layer(&[("a/../../escape", F, "x")]),
            // A symlink to outside, then a file written "through" it.
            layer(&[("evil", S, outside.path().to_str().unwrap()), ("evil/pwned", F, "x")]),
            // The same via a relative symlink.
            layer(&[("up", S, "../../../../.."), ("up/tmp/pwned", F, "x")]),
            // A hard link to a host file.
            layer(&[("passwd", H, "../../../../etc/passwd")]),
        ];
        for (i, l) in cases.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("rootfs");
            fs::create_dir(&root).unwrap();
            let e = apply_layer(&l[..], &root).expect_err(&format!("case {i} accepted"));
            assert!(matches!(e, ImageError::UnsafeLayer(_)), "case {i}: {e}");
            assert!(!dir.path().join("escape").exists() && !outside.path().join("pwned").exists(), "case {i} escaped");
        }
        // Absolute paths are taken relative to the rootfs, not the host.
        let dir = tempfile::tempdir().unwrap();
        apply_layer(&layer(&[("/etc/hostname", F, "box")])[..], dir.path()).unwrap();
        assert_eq!(fs::read_to_string(dir.path().join("etc/hostname")).unwrap(), "box");
    }

    #[test]
    fn a_file_replacing_a_symlink_does_not_write_through_it() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("target"), "host").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let target = outside.path().join("target");
        apply_layer(&layer(&[("link", S, target.to_str().unwrap())])[..], dir.path()).unwrap();
        apply_layer(&layer(&[("link", F, "image")])[..], dir.path()).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "host");
        assert_eq!(fs::read_to_string(dir.path().join("link")).unwrap(), "image");
    }
}
