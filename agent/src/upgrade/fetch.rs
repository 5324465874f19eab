//! Downloading a release over the device's own MQTT link, piece by piece
//! (`ReleaseRequest` → `ReleaseChunk`), into `upgrade/<sha256>.part`: the
//! bytes on disk are the resume point after a cut link or a restart. A
//! finished file is checked whole — SHA-256 against the signed target, an
//! ELF for this CPU — before anything is staged.

use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use baton_protocol::release::{elf_arch, AgentTarget, ReleaseChunk, ReleaseRequest, CHUNK_BYTES};

use super::switch::{sha256_file, Paths};

/// No piece for this long: the ones in flight are asked for again (the
/// controller or the link may have dropped them).
const RETRY_AFTER: Duration = Duration::from_secs(15);

/// Pieces asked for ahead of the one being written: enough to keep a link
/// with a round trip of a few hundred ms busy, little memory on either side
/// (the broker holds at most this many for the device).
pub const WINDOW: u64 = 4;

pub struct Download {
    pub target: AgentTarget,
    pub part: PathBuf,
    /// Bytes on disk so far.
    pub offset: u64,
    /// Bytes asked for so far (pieces in flight end here).
    asked_to: u64,
    /// When the last piece arrived, or the first was asked for.
    progress_at: Option<Instant>,
}

/// What a piece changed.
#[derive(Debug)]
pub enum Progress {
    /// Ask for these next.
    Next(Vec<ReleaseRequest>),
    /// The whole file is there and checked.
    Complete,
    /// Not for this download, or a piece already written: nothing to do.
    Ignored,
}

impl Download {
    /// Starts (or resumes, from what the part file holds) a download of
    /// `target`; checks there is room for it first. Parts of other
    /// releases are deleted.
    pub fn start(paths: &Paths, target: AgentTarget, reserve: u64) -> Result<Self, String> {
        std::fs::create_dir_all(&paths.upgrade).map_err(|e| format!("create {}: {e}", paths.upgrade.display()))?;
        let part = paths.part(&target.digest);
        if let Ok(entries) = std::fs::read_dir(&paths.upgrade) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "part") && e.path() != part {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let have = std::fs::metadata(&part).map_or(0, |m| m.len());
        let offset = if have > target.size { 0 } else { have };
        let needed = target.size.saturating_sub(offset);
        crate::image::space::check(&paths.upgrade, needed, reserve, "the new agent").map_err(|e| e.to_string())?;
        if offset == 0 {
            std::fs::write(&part, b"").map_err(|e| format!("create {}: {e}", part.display()))?;
        }
        Ok(Download { target, part, offset, asked_to: offset, progress_at: None })
    }

    pub fn complete(&self) -> bool {
        self.offset >= self.target.size
    }

    /// Asks for pieces from the first byte missing, up to the window
    /// (again, for pieces in flight that may be lost: after a reconnect).
    pub fn restart(&mut self, now: Instant) -> Vec<ReleaseRequest> {
        self.asked_to = self.offset;
        self.progress_at = Some(now);
        self.fill()
    }

    /// Requests for what the window has room for.
    fn fill(&mut self) -> Vec<ReleaseRequest> {
        let mut out = Vec::new();
        let chunk = u64::from(CHUNK_BYTES);
        while self.asked_to < self.target.size && self.asked_to < self.offset + WINDOW * chunk {
            let len = chunk.min(self.target.size - self.asked_to);
            out.push(ReleaseRequest { digest: self.target.digest.clone(), offset: self.asked_to, len: len as u32 });
            self.asked_to += len;
        }
        out
    }

    /// Every piece in flight again when none arrived for a while.
    pub fn overdue(&mut self, now: Instant) -> Vec<ReleaseRequest> {
        match self.progress_at {
            Some(at) if !self.complete() && now.duration_since(at) >= RETRY_AFTER => self.restart(now),
            _ => Vec::new(),
        }
    }

    /// Writes a piece in order; an error ends the download (reported, the
    /// part kept for the next try unless it is wrong).
    pub fn accept(&mut self, chunk: &ReleaseChunk, now: Instant) -> Result<Progress, String> {
        if chunk.digest != self.target.digest || chunk.offset != self.offset {
            return Ok(Progress::Ignored);
        }
        if let Some(e) = &chunk.error {
            return Err(format!("the controller cannot send it: {e}"));
        }
        if chunk.total != self.target.size {
            return Err(format!(
                "the controller holds {} bytes for it, the signed document says {}",
                chunk.total, self.target.size
            ));
        }
        if chunk.data.is_empty() || self.offset + chunk.data.len() as u64 > self.target.size {
            return Err(format!("a piece of {} bytes at {} does not fit the release", chunk.data.len(), self.offset));
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.part)
            .map_err(|e| format!("open {}: {e}", self.part.display()))?;
        f.seek(SeekFrom::Start(self.offset))
            .and_then(|_| f.write_all(&chunk.data))
            .map_err(|e| format!("write {}: {e}", self.part.display()))?;
        self.offset += chunk.data.len() as u64;
        self.progress_at = Some(now);
        if !self.complete() {
            return Ok(Progress::Next(self.fill()));
        }
        f.sync_all().map_err(|e| format!("sync {}: {e}", self.part.display()))?;
        self.verify().inspect_err(|_| {
            let _ = std::fs::remove_file(&self.part);
        })?;
        Ok(Progress::Complete)
    }

    /// The whole file: its SHA-256 is the signed one, and it is an
    /// executable for this CPU.
    pub fn verify(&self) -> Result<(), String> {
        let digest = sha256_file(&self.part).map_err(|e| format!("read {}: {e}", self.part.display()))?;
        if digest != self.target.digest {
            return Err(format!(
                "the download's SHA-256 is {}, the signed document says {}",
                baton_protocol::crypto::hex(&digest),
                baton_protocol::crypto::hex(&self.target.digest)
            ));
        }
        let mut head = [0u8; 64];
        let n = std::fs::File::open(&self.part)
            .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
            .map_err(|e| format!("read {}: {e}", self.part.display()))?;
        match elf_arch(&head[..n]) {
            Some(arch) if arch == std::env::consts::ARCH => Ok(()),
            Some(arch) => Err(format!("it is a build for {arch}; this device is {}", std::env::consts::ARCH)),
            None => Err("it is not an ELF executable for Linux".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn release() -> Vec<u8> {
        let mut elf = std::fs::read("/proc/self/exe").unwrap();
        elf.truncate(150_000);
        elf
    }

    fn chunk(bytes: &[u8], digest: &[u8], offset: u64, len: u32) -> ReleaseChunk {
        let end = (offset as usize + len as usize).min(bytes.len());
        ReleaseChunk {
            digest: digest.to_vec(),
            offset,
            total: bytes.len() as u64,
            data: bytes[offset as usize..end].to_vec(),
            error: None,
        }
    }

    /// Serves every request in order from `bytes` until the download ends.
    fn fetch_all(d: &mut Download, bytes: &[u8], digest: &[u8]) -> Result<(), String> {
        let now = Instant::now();
        let mut queue: std::collections::VecDeque<ReleaseRequest> = d.restart(now).into();
        while let Some(req) = queue.pop_front() {
            match d.accept(&chunk(bytes, digest, req.offset, req.len), now)? {
                Progress::Next(r) => queue.extend(r),
                Progress::Complete => return Ok(()),
                Progress::Ignored => panic!("in-order piece ignored"),
            }
        }
        panic!("the download never completed")
    }

    #[test]
    fn a_download_cut_half_way_resumes_from_the_bytes_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        let bytes = release();
        let digest = Sha256::digest(&bytes).to_vec();
        let target =
            AgentTarget { version: "2".into(), digest: digest.clone(), size: bytes.len() as u64, ..Default::default() };
        let now = Instant::now();
        let mut d = Download::start(&paths, target.clone(), 0).unwrap();
        let first = d.restart(now);
        let offsets: Vec<u64> = first.iter().map(|r| r.offset).collect();
        let c = u64::from(CHUNK_BYTES);
        assert_eq!(offsets, [0, c, 2 * c], "150 000 bytes: three pieces, all in the window");
        assert_eq!(u64::from(first[2].len), 150_000 - 2 * c);
        let got = d.accept(&chunk(&bytes, &digest, 0, first[0].len), now);
        assert!(matches!(got, Ok(Progress::Next(ref r)) if r.is_empty()), "{got:?}");
        // A duplicate of the first piece, or one out of order, changes nothing.
        assert!(matches!(d.accept(&chunk(&bytes, &digest, 0, first[0].len), now), Ok(Progress::Ignored)));
        assert!(matches!(d.accept(&chunk(&bytes, &digest, 2 * c, first[2].len), now), Ok(Progress::Ignored)));
        assert!(d.overdue(now + RETRY_AFTER / 2).is_empty(), "not overdue yet");
        let again: Vec<u64> = d.overdue(now + RETRY_AFTER).iter().map(|r| r.offset).collect();
        assert_eq!(again, [c, 2 * c], "pieces in flight asked for again");
        drop(d);
        // The link was cut; a new start resumes at the first missing byte.
        let mut d = Download::start(&paths, target, 0).unwrap();
        assert_eq!(d.offset, c);
        fetch_all(&mut d, &bytes, &digest).unwrap();
        assert_eq!(std::fs::read(&d.part).unwrap(), bytes);
        assert!(d.overdue(now + RETRY_AFTER).is_empty(), "nothing left to ask for");
    }

    #[test]
    fn a_wrong_digest_or_a_foreign_cpu_is_refused_and_the_part_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        let mut bytes = release();
        let digest = Sha256::digest(&bytes).to_vec();
        let target =
            AgentTarget { version: "2".into(), digest: digest.clone(), size: bytes.len() as u64, ..Default::default() };
        bytes[100_000] ^= 1; // corrupted on the way
        let mut d = Download::start(&paths, target, 0).unwrap();
        let err = fetch_all(&mut d, &bytes, &digest).unwrap_err();
        assert!(err.contains("SHA-256"), "{err}");
        assert!(!d.part.exists());

        let mut foreign = release();
        foreign[18] = 0xb7; // aarch64
        foreign[4] = 2;
        let digest = Sha256::digest(&foreign).to_vec();
        let target = AgentTarget {
            version: "2".into(),
            digest: digest.clone(),
            size: foreign.len() as u64,
            ..Default::default()
        };
        let mut d = Download::start(&paths, target, 0).unwrap();
        let err = fetch_all(&mut d, &foreign, &digest).unwrap_err();
        if std::env::consts::ARCH != "aarch64" {
            assert!(err.contains("build for aarch64"), "{err}");
        }
    }

    #[test]
    fn no_room_is_refused_before_a_byte_is_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        let target = AgentTarget { version: "2".into(), digest: vec![1; 32], size: 1 << 20, ..Default::default() };
        let err = Download::start(&paths, target, u64::MAX / 2).err().unwrap();
        assert!(err.contains("the new agent"), "{err}");
    }
}
