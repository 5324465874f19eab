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
//!
//! What is kept of each entry, as Docker and Podman keep it: owner, mode
//! (setuid/setgid/sticky included), modification and access times (PAX
//! precision; directories get theirs once their contents are written), and
//! these extended attributes from PAX `SCHILY.xattr.*` records:
//! `security.capability` (file capabilities, e.g. a server binding port 80
//! as non-root), `user.*`, and POSIX ACLs (`system.posix_acl_*`). Never
//! `trusted.*` (overlayfs's own markers: a layer must not forge opaque
//! directories or redirects) nor `security.selinux`/`ima`/`evm` (host
//! policy). A whiteout only hides what lower layers had: one under a path
//! this layer made a non-directory has nothing left to hide and is skipped.
//!
//! One file although long (a quarter is tests): the escape rules above and
//! both targets share one walk over the tar stream; split, rules that must
//! hold together would live apart.

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

/// Whether an extended attribute from a layer is kept (see the module docs).
pub fn xattr_kept(name: &str) -> bool {
    name == "security.capability"
        || name.starts_with("user.")
        || name == "system.posix_acl_access"
        || name == "system.posix_acl_default"
}

/// A file time: (seconds, nanoseconds) since the epoch.
pub type Time = (i64, i64);

/// Sets access and modification times on `path` itself (not through a symlink).
pub fn set_times(path: &Path, atime: Time, mtime: Time) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let ts = |(s, ns): Time| libc::timespec { tv_sec: s as _, tv_nsec: ns as _ };
    let times = [ts(atime), ts(mtime)];
    // SAFETY: a NUL-terminated path and an array of two timespecs, as utimensat(2) wants.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The kept extended attributes of `path` itself, with their values.
pub fn kept_xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(p) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return Vec::new() };
    let mut names = vec![0u8; 4096];
    // SAFETY: a NUL-terminated path and a buffer of the length given.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Vec::new();
    }
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(name) = std::str::from_utf8(name) else { continue };
        if !xattr_kept(name) {
            continue;
        }
        let Ok(cname) = std::ffi::CString::new(name) else { continue };
        let mut value = vec![0u8; 64 * 1024];
        // SAFETY: NUL-terminated strings and a buffer of the length given.
        let len = unsafe { libc::lgetxattr(p.as_ptr(), cname.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        if len >= 0 {
            value.truncate(len as usize);
            out.push((name.to_string(), value));
        }
    }
    out
}

/// Gives `dst` the owner, mode, kept xattrs and times of `src` (a file of a
/// lower layer copied into this one, or the copy fallback's merged tree).
/// Owner first: chown(2) clears file capabilities.
pub fn copy_meta(src: &fs::Metadata, src_path: &Path, dst: &Path) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dst, Some(src.uid()), Some(src.gid()))?;
    if !src.file_type().is_symlink() {
        fs::set_permissions(dst, fs::Permissions::from_mode(src.mode() & 0o7777))?;
        for (name, value) in kept_xattrs(src_path) {
            set_xattr(dst, &name, &value)?;
        }
    }
    set_times(dst, (src.atime(), src.atime_nsec()), (src.mtime(), src.mtime_nsec()))
}

/// A PAX time (`1700000000.123456789`) as (seconds, nanoseconds).
fn pax_time(v: &str) -> Option<Time> {
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let ns = if digits.is_empty() { 0 } else { format!("{digits:0<9}").parse().ok()? };
    Some((secs, if secs < 0 && ns > 0 { -ns } else { ns }))
}

/// What a layer entry says beyond its header's fixed fields.
#[derive(Default)]
struct Extended {
    xattrs: Vec<(String, Vec<u8>)>,
    mtime: Option<Time>,
    atime: Option<Time>,
}

fn extended<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Extended, ImageError> {
    let mut ext = Extended::default();
    let Some(records) = entry.pax_extensions().map_err(ImageError::io("read PAX header"))? else {
        return Ok(ext);
    };
    for record in records {
        let record = record.map_err(ImageError::io("read PAX record"))?;
        let Ok(key) = record.key() else { continue };
        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            if xattr_kept(name) {
                ext.xattrs.push((name.to_string(), record.value_bytes().to_vec()));
            }
        } else if key == "mtime" {
            ext.mtime = record.value().ok().and_then(pax_time);
        } else if key == "atime" {
            ext.atime = record.value().ok().and_then(pax_time);
        }
    }
    Ok(ext)
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
    let tail = Tail { inner: reader, pos: Default::default(), fill_until: Default::default() };
    let (pos, fill_until) = (tail.pos.clone(), tail.fill_until.clone());
    let mut archive = tar::Archive::new(tail);
    let mut stats = LayerStats::default();
    // Paths this layer created: an opaque marker hides lower layers only.
    let mut created: HashSet<PathBuf> = HashSet::new();
    // Directories' times, set once nothing more is written into them (deepest first).
    let mut dir_times: Vec<(PathBuf, Time, Time)> = Vec::new();
    let mut entries = archive.entries().map_err(ImageError::io("read layer"))?;
    loop {
        // Whatever was read of the stream is whole: it may end here without
        // its last padding and end-of-archive blocks (see `Tail`).
        fill_until.set(pos.get().next_multiple_of(512) + 1024);
        let Some(entry) = entries.next() else { break };
        let mut entry = entry.map_err(ImageError::io("read layer entry"))?;
        fill_until.set(pos.get()); // an entry's own data is never made up
        let raw = entry.path().map_err(ImageError::io("read entry path"))?.into_owned();
        let Some(rel) = normalise(&raw)? else { continue };
        stats.entries += 1;
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let kind = entry.header().entry_type();

        if name.starts_with(WHITEOUT) && hidden_by_this_layer(root, &rel, &created) {
            // e.g. umoci's dir2file: the file replaced the directory, whose
            // lower contents are gone with it; the whiteout hides nothing more.
            stats.whiteouts += 1;
            continue;
        }
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
        let ext = extended(&mut entry)?;
        let mtime = ext.mtime.unwrap_or((entry.header().mtime().unwrap_or(0) as i64, 0));
        let atime = ext.atime.unwrap_or(mtime);

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
                let size = entry.size();
                let before = stats.bytes;
                copy_guarded(&mut entry, &mut f, &mut stats.bytes, guard)
                    .map_err(|e| e.within(&format!("write {}", dest.display())))?;
                if stats.bytes - before != size {
                    return Err(ImageError::Invalid(format!(
                        "layer ends inside {} ({} of its {size} bytes)",
                        rel.display(),
                        stats.bytes - before
                    )));
                }
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
                    copy_meta(&m, &lower, &dest)
                        .map_err(ImageError::io(format!("copy metadata to {}", dest.display())))?;
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
        // Owner, then mode, then xattrs: chown(2) clears file capabilities.
        std::os::unix::fs::lchown(&dest, Some(uid as u32), Some(gid as u32))
            .map_err(ImageError::io(format!("chown {}", dest.display())))?;
        if kind != tar::EntryType::Symlink {
            fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
                .map_err(ImageError::io(format!("chmod {}", dest.display())))?;
            for (xname, value) in &ext.xattrs {
                set_xattr(&dest, xname, value).map_err(ImageError::io(format!("set {xname} on {}", dest.display())))?;
            }
        }
        if kind.is_dir() {
            dir_times.push((dest, atime, mtime));
        } else {
            set_times(&dest, atime, mtime).map_err(ImageError::io(format!("set times of {}", dest.display())))?;
        }
        created.insert(rel);
    }
    // Deepest first, so that setting a child's times does not move its parent's.
    dir_times.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.components().count()));
    for (dir, atime, mtime) in dir_times {
        set_times(&dir, atime, mtime).map_err(ImageError::io(format!("set times of {}", dir.display())))?;
    }
    Ok(stats)
}

/// Whether a whiteout at `rel` falls under a path this layer made something
/// other than a directory (so the lower tree it names is already hidden).
fn hidden_by_this_layer(root: &Path, rel: &Path, created: &HashSet<PathBuf>) -> bool {
    rel.ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
        .any(|a| created.contains(a) && fs::symlink_metadata(root.join(a)).is_ok_and(|m| !m.is_dir()))
}

/// The layer stream, as Go's archive/tar (so Docker, containerd, Podman and
/// umoci) reads it: a stream that ends right after its last entry's data,
/// without the padding to 512 bytes and the two zero blocks that close a tar
/// (umoci 0.4 writes such layers), ends there. Past the end of `inner`, it
/// gives zeros up to `fill_until` — which the unpack sets, before asking for
/// each next entry, to just past what a whole archive would still have —
/// so a stream cut inside an entry's data still fails (its size is checked).
struct Tail<R> {
    inner: R,
    pos: std::rc::Rc<std::cell::Cell<u64>>,
    fill_until: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Tail<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let allowed = self.fill_until.get().saturating_sub(self.pos.get());
            n = usize::try_from(allowed).unwrap_or(usize::MAX).min(buf.len());
            buf[..n].fill(0);
        }
        self.pos.set(self.pos.get() + n as u64);
        Ok(n)
    }
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
    fn a_layer_without_its_closing_blocks_reads_whole_and_one_cut_in_a_file_fails() {
        let full = layer(&[("etc/", D, ""), ("etc/motd", F, "hello"), ("etc/z", F, "abc")]);
        // As umoci writes a one-file layer: header and data, no padding, no end blocks.
        let data_end = full.len() - 1024 - (512 - 3);
        let dir = tempfile::tempdir().unwrap();
        apply_layer(&full[..data_end], dir.path()).unwrap();
        assert_eq!(fs::read_to_string(dir.path().join("etc/z")).unwrap(), "abc");
        assert_eq!(fs::read_to_string(dir.path().join("etc/motd")).unwrap(), "hello");
        let dir = tempfile::tempdir().unwrap();
        let e = apply_layer(&full[..data_end - 2], dir.path()).unwrap_err();
        assert!(e.to_string().contains("ends inside etc/z"), "{e}");
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
