//! Container output into a size-capped, rotated file, written in batches.
//!
//! SD cards wear out: the shim buffers output and writes at most once per
//! `flush_every` (or when the buffer fills), never per line. Each line gets a
//! timestamp and its stream: `2026-11-27T09:00:00.123Z stdout hello`.
//! When the file would exceed `max_bytes` it becomes `<name>.1` (replacing
//! the previous one) and a new file starts: at most 2 × max_bytes on disk.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Longest line kept whole; longer output is split (a log is not a data channel).
const MAX_LINE: usize = 16 * 1024;

pub struct LogWriter {
    path: PathBuf,
    max_bytes: u64,
    flush_every_ms: u64,
    file: Option<File>,
    size: u64,
    /// Formatted lines not yet written.
    pending: Vec<u8>,
    /// When the oldest pending byte arrived.
    pending_since_ms: Option<u64>,
    /// After a failed write (the disk full, the directory gone): when to try
    /// again. The shim's loop sleeps until then instead of spinning.
    retry_at_ms: Option<u64>,
    partial: [Vec<u8>; 2],
}

/// How long a failed log write waits before the next attempt.
const RETRY_AFTER_MS: u64 = 5_000;

impl LogWriter {
    pub fn new(path: &Path, max_bytes: u64, flush_every_ms: u64) -> Self {
        let size = std::fs::metadata(path).map_or(0, |m| m.len());
        Self {
            path: path.to_owned(),
            max_bytes: max_bytes.max(4096),
            flush_every_ms,
            file: None,
            size,
            pending: Vec::new(),
            pending_since_ms: None,
            retry_at_ms: None,
            partial: [Vec::new(), Vec::new()],
        }
    }

    /// Takes raw output of one stream; whole lines are queued with a timestamp.
    pub fn push(&mut self, stream: Stream, mut data: &[u8], now_ms: u64) {
        let idx = stream as usize;
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.partial[idx].extend_from_slice(&data[..nl]);
                    self.emit(stream, now_ms);
                    data = &data[nl + 1..];
                }
                None => {
                    self.partial[idx].extend_from_slice(data);
                    data = &[];
                }
            }
            if self.partial[idx].len() >= MAX_LINE {
                self.emit(stream, now_ms);
            }
        }
    }

    fn emit(&mut self, stream: Stream, now_ms: u64) {
        let line = std::mem::take(&mut self.partial[stream as usize]);
        self.pending.extend_from_slice(rfc3339_ms(now_ms).as_bytes());
        self.pending.push(b' ');
        self.pending.extend_from_slice(stream.name().as_bytes());
        self.pending.push(b' ');
        self.pending.extend_from_slice(&line);
        self.pending.push(b'\n');
        self.pending_since_ms.get_or_insert(now_ms);
        // Output that cannot be written (yet) is bounded like the file: the newest stays.
        if self.pending.len() as u64 > 2 * self.max_bytes {
            self.keep_newest(self.max_bytes as usize);
        }
    }

    /// Drops the oldest pending lines, keeping at most `limit` bytes of whole lines.
    fn keep_newest(&mut self, limit: usize) {
        let excess = self.pending.len().saturating_sub(limit);
        if excess == 0 {
            return;
        }
        let cut =
            self.pending[excess..].iter().position(|b| *b == b'\n').map_or(self.pending.len(), |p| excess + p + 1);
        self.pending.drain(..cut);
    }

    /// Milliseconds until the next flush is due, if anything is pending.
    pub fn due_in_ms(&self, now_ms: u64) -> Option<u64> {
        let due = self.pending_since_ms.map(|t| t + self.flush_every_ms)?;
        Some(due.max(self.retry_at_ms.unwrap_or(0)).saturating_sub(now_ms))
    }

    /// Writes pending lines if they are old enough or the buffer is big (not
    /// before the retry time of a failed write).
    pub fn maybe_flush(&mut self, now_ms: u64) -> std::io::Result<()> {
        if self.retry_at_ms.is_some_and(|at| now_ms < at) {
            return Ok(());
        }
        let due = self.due_in_ms(now_ms) == Some(0) || self.pending.len() >= 64 * 1024;
        if due {
            match self.flush() {
                Ok(()) => self.retry_at_ms = None,
                Err(e) => {
                    self.retry_at_ms = Some(now_ms + RETRY_AFTER_MS);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Writes everything, including unterminated lines (at exit).
    pub fn finish(&mut self, now_ms: u64) -> std::io::Result<()> {
        for stream in [Stream::Stdout, Stream::Stderr] {
            if !self.partial[stream as usize].is_empty() {
                self.emit(stream, now_ms);
            }
        }
        self.flush()
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.pending.len() as u64 > self.max_bytes {
            // More output than a file holds arrived between two flushes: keep
            // the newest whole lines that fit; the rest would be rotated away anyway.
            self.keep_newest(self.max_bytes as usize);
            if self.pending.is_empty() {
                self.pending_since_ms = None;
                return Ok(());
            }
        }
        if self.size > 0 && self.size + self.pending.len() as u64 > self.max_bytes {
            self.file = None;
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            std::fs::rename(&self.path, rotated)?;
            self.size = 0;
        }
        if self.file.is_none() {
            self.file = Some(OpenOptions::new().create(true).append(true).open(&self.path)?);
        }
        if let Some(f) = self.file.as_mut() {
            f.write_all(&self.pending)?;
        }
        self.size += self.pending.len() as u64;
        self.pending.clear();
        self.pending_since_ms = None;
        Ok(())
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for Unix milliseconds (proleptic Gregorian, UTC).
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (year, month, day) = crate::clock::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_that_cannot_be_written_waits_to_retry_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        // Its directory is gone (a full or failing disk does the same to a write).
        let mut log = LogWriter::new(&dir.path().join("gone/container.log"), 4096, 100);
        log.push(Stream::Stdout, b"one\n", 1_000);
        assert!(log.maybe_flush(1_100).is_err());
        // The shim's loop would spin on a zero timeout: the next try waits.
        assert_eq!(log.due_in_ms(1_100), Some(RETRY_AFTER_MS));
        assert!(log.maybe_flush(1_200).is_ok(), "tried again before its time");
        for i in 0..10_000 {
            log.push(Stream::Stdout, format!("line {i}\n").as_bytes(), 2_000);
        }
        assert!(log.pending.len() <= 2 * 4096, "pending grew to {}", log.pending.len());
        assert!(log.pending.ends_with(b"stdout line 9999\n"), "the newest output was dropped");
        // The directory is back: the next try writes.
        std::fs::create_dir(dir.path().join("gone")).unwrap();
        assert!(log.maybe_flush(1_100 + RETRY_AFTER_MS).is_ok());
        assert!(std::fs::read_to_string(dir.path().join("gone/container.log")).unwrap().contains("line 9999"));
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_795_770_611_311), "2026-11-27T09:10:11.311Z");
    }

    #[test]
    fn batches_lines_and_writes_only_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut w = LogWriter::new(&path, 1 << 20, 1000);
        w.push(Stream::Stdout, b"hello\nwor", 0);
        w.push(Stream::Stderr, b"oops\n", 10);
        w.push(Stream::Stdout, b"ld\n", 20);
        w.maybe_flush(500).unwrap();
        assert!(!path.exists(), "wrote before the batch was due");
        assert_eq!(w.due_in_ms(500), Some(500));
        w.maybe_flush(1000).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "1970-01-01T00:00:00.000Z stdout hello\n1970-01-01T00:00:00.010Z stderr oops\n1970-01-01T00:00:00.020Z stdout world\n"
        );
        w.push(Stream::Stdout, b"no newline", 2000);
        w.finish(2000).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("stdout no newline\n"));
    }

    #[test]
    fn a_burst_bigger_than_the_cap_keeps_the_newest_lines_within_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut w = LogWriter::new(&path, 4096, 1000);
        for i in 0..1000 {
            w.push(Stream::Stdout, format!("line {i}\n").as_bytes(), 0);
        }
        w.flush().unwrap();
        w.push(Stream::Stdout, b"after\n", 1);
        w.finish(1).unwrap();
        let total: u64 = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        assert!(total <= 2 * 4096, "{total} bytes on disk for a 4096-byte cap");
        let all = std::fs::read_to_string(dir.path().join("c.log.1")).unwrap_or_default()
            + &std::fs::read_to_string(&path).unwrap();
        assert!(
            all.contains("stdout line 999\n") && all.ends_with("stdout after\n") && !all.contains("stdout line 0\n"),
            "{all}"
        );
        assert!(all.lines().all(|l| l.contains(" stdout ")), "a line was cut in half");
    }

    #[test]
    fn rotates_at_the_cap_keeping_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut w = LogWriter::new(&path, 4096, 0);
        for i in 0..500 {
            w.push(Stream::Stdout, format!("line {i}\n").as_bytes(), i);
            w.flush().unwrap();
        }
        let cur = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(dir.path().join("c.log.1")).unwrap().len();
        assert!(cur <= 4096 && old <= 4096, "{cur} {old}");
        assert!(std::fs::read_to_string(&path).unwrap().contains("line 499"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
