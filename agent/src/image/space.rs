//! Room on the data disk. A pull or an unpack that cannot fit fails at once
//! with a clear error, frees what it wrote, and never takes the space the
//! agent needs for its own state (desired document, accepted-command ids,
//! exit records, container logs): `reserve` bytes stay free.

use std::path::Path;

use super::ImageError;

/// Bytes free for an unprivileged writer on the filesystem holding `dir`.
// The block counts are 32-bit on armv7: the conversions are not useless there.
#[allow(clippy::useless_conversion)]
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size())))
}

/// Whether an I/O error means the disk (or the quota) is full.
pub fn is_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// `Ok` when `needed` bytes fit on `dir`'s filesystem with `reserve` left over.
pub fn check(dir: &Path, needed: u64, reserve: u64, what: &str) -> Result<(), ImageError> {
    let free = free_bytes(dir).map_err(ImageError::io(format!("statvfs {}", dir.display())))?;
    if free < needed.saturating_add(reserve) {
        return Err(ImageError::NoSpace { what: what.to_string(), needed, free, reserve });
    }
    Ok(())
}

/// The error a full disk met half-way gives (after the caller removed what it wrote).
pub fn full(dir: &Path, needed: u64, reserve: u64, what: &str) -> ImageError {
    ImageError::NoSpace { what: what.to_string(), needed, free: free_bytes(dir).unwrap_or(0), reserve }
}

/// What unpacking a layer blob will write, roughly: gzip keeps the size of its
/// (last member's) input in its last 4 bytes (mod 4 GiB), zstd frames usually
/// carry it; otherwise four times the compressed size. Plain tar: its size.
pub fn unpacked_estimate(blob: &Path, media_type_hint: Compression) -> u64 {
    let compressed = std::fs::metadata(blob).map_or(0, |m| m.len());
    let read_tail = || -> Option<u64> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(blob).ok()?;
        f.seek(SeekFrom::End(-4)).ok()?;
        let mut b = [0u8; 4];
        f.read_exact(&mut b).ok()?;
        Some(u64::from(u32::from_le_bytes(b)))
    };
    match media_type_hint {
        Compression::None => compressed,
        // ISIZE is mod 2^32: below the compressed size it wrapped (or lies); guess then.
        Compression::Gzip => read_tail().filter(|n| *n >= compressed / 2).unwrap_or(compressed.saturating_mul(4)),
        Compression::Zstd => compressed.saturating_mul(4),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_counts_the_reserve_and_says_what_did_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        assert!(check(dir.path(), 1, 0, "x").is_ok());
        let e = check(dir.path(), free, 1 << 20, "image big:1").unwrap_err().to_string();
        assert!(e.contains("no space") && e.contains("image big:1"), "{e}");
        assert!(is_full(&std::io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(!is_full(&std::io::Error::from_raw_os_error(libc::EIO)));
    }

    #[test]
    fn a_gzip_layer_says_how_big_it_unpacks() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&vec![0u8; 1 << 20]).unwrap();
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        assert_eq!(unpacked_estimate(&path, Compression::Gzip), 1 << 20);
        assert_eq!(unpacked_estimate(&path, Compression::None), std::fs::metadata(&path).unwrap().len());
    }
}
