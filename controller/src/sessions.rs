//! Interactive sessions (`baton exec -i/-t`) as the controller keeps them:
//! who opened which, where its input is, what it moved — and the frames its
//! output travels in to the CLI (one streamed HTTP response per session).
//!
//! Frame: a tag byte, a big-endian u32 length, then that many bytes.
//! Tags: 1 opened (u64 session id), 2 stdout, 3 stderr, 4 exit (i32 code),
//! 5 error (UTF-8 text, the session's end), 6 text (what the device says
//! along the way: a copy's offset or digest). A decoder takes any split of
//! the stream and refuses what is not a frame.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex, PoisonError};

use baton_protocol::DeviceId;

/// The controller acknowledges output every this many bytes passed on, well
/// inside the device's window (`baton_agent::session::WINDOW`, 128 KiB), so
/// a steady stream never stalls on acknowledgements.
pub const ACK_EVERY: u64 = 32 * 1024;
/// Input per command: well under a command's 16 KiB limit.
pub const INPUT_CHUNK: usize = 8 * 1024;
/// Input commands in flight at once: the device queues 8
/// (`baton_agent::session`'s input queue).
pub const INPUT_IN_FLIGHT: usize = 8;
/// The largest frame a decoder takes (output comes in 16 KiB pieces).
const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Opened(u64),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(i32),
    Error(String),
    Text(String),
}

impl Frame {
    pub fn encode(&self) -> Vec<u8> {
        let (tag, body): (u8, Vec<u8>) = match self {
            Self::Opened(id) => (1, id.to_be_bytes().to_vec()),
            Self::Stdout(b) => (2, b.clone()),
            Self::Stderr(b) => (3, b.clone()),
            Self::Exit(code) => (4, code.to_be_bytes().to_vec()),
            Self::Error(text) => (5, text.as_bytes().to_vec()),
            Self::Text(text) => (6, text.as_bytes().to_vec()),
        };
        let mut out = Vec::with_capacity(5 + body.len());
        out.push(tag);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }
}

/// Frames out of a byte stream, whatever its pieces.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame; None: more bytes needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, String> {
        let Some((&tag, rest)) = self.buf.split_first() else { return Ok(None) };
        let Some(len) = rest.get(..4).map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize) else {
            return Ok(None);
        };
        if len > MAX_FRAME {
            return Err(format!("a session frame of {len} bytes (at most {MAX_FRAME})"));
        }
        let Some(body) = rest.get(4..4 + len) else { return Ok(None) };
        let fixed = |n: usize| if len == n { Ok(()) } else { Err(format!("a frame of tag {tag} with {len} bytes")) };
        let frame = match tag {
            1 => {
                fixed(8)?;
                Frame::Opened(u64::from_be_bytes(body.try_into().map_err(|_| "bad session id")?))
            }
            2 => Frame::Stdout(body.to_vec()),
            3 => Frame::Stderr(body.to_vec()),
            4 => {
                fixed(4)?;
                Frame::Exit(i32::from_be_bytes(body.try_into().map_err(|_| "bad exit code")?))
            }
            5 => Frame::Error(String::from_utf8_lossy(body).into_owned()),
            6 => Frame::Text(String::from_utf8_lossy(body).into_owned()),
            other => return Err(format!("unknown session frame tag {other}")),
        };
        self.buf.drain(..5 + len);
        Ok(Some(frame))
    }
}

/// Output pieces in the order the device numbered them (`seq` counts a
/// session's stdout and stderr messages from 0). A QoS 1 redelivery after a
/// reconnect brings a piece again: it is dropped, not passed on twice (a
/// forwarded connection would carry it twice). A piece that never came
/// means the stream has a hole: the session must end rather than go on
/// corrupted.
#[derive(Debug, Default)]
pub struct OutputOrder {
    next: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Order {
    /// The next piece: pass it on.
    Next,
    /// Already passed on.
    Again,
    /// Pieces `expected..got` are missing.
    Gap { expected: u32, got: u32 },
}

impl OutputOrder {
    pub fn check(&mut self, seq: u32) -> Order {
        if seq < self.next {
            return Order::Again;
        }
        if seq > self.next {
            return Order::Gap { expected: self.next, got: seq };
        }
        self.next = seq.saturating_add(1);
        Order::Next
    }
}

/// One open session.
pub struct Session {
    pub device: DeviceId,
    /// Who opened it (`token NAME (ID)`): only they may type into it.
    pub caller: String,
    /// Bytes of input the device has written; held while a piece is on its
    /// way, so pieces go one after another, in order.
    pub input: tokio::sync::Mutex<u64>,
    pub resize_seq: AtomicU32,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// Sessions open through this controller, by id (the opening command's).
#[derive(Default)]
pub struct Registry {
    open: Mutex<HashMap<u64, Arc<Session>>>,
}

impl Registry {
    pub fn insert(&self, id: u64, session: Session) -> Arc<Session> {
        let s = Arc::new(session);
        self.open.lock().unwrap_or_else(PoisonError::into_inner).insert(id, s.clone());
        s
    }

    pub fn get(&self, id: u64) -> Option<Arc<Session>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).get(&id).cloned()
    }

    pub fn remove(&self, id: u64) {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
    }

    pub fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_passes_once_in_order_and_a_hole_is_seen() {
        let mut o = OutputOrder::default();
        assert_eq!(o.check(0), Order::Next);
        assert_eq!(o.check(1), Order::Next);
        // Redelivered after a reconnect: both already passed on.
        assert_eq!(o.check(0), Order::Again);
        assert_eq!(o.check(1), Order::Again);
        assert_eq!(o.check(2), Order::Next);
        assert_eq!(o.check(4), Order::Gap { expected: 3, got: 4 });
        // A hole does not move the count on: what follows is still missing 3.
        assert_eq!(o.check(5), Order::Gap { expected: 3, got: 5 });
        assert_eq!(o.check(3), Order::Next);
    }

    #[test]
    fn frames_survive_any_split_and_bad_ones_are_refused() {
        let frames = vec![
            Frame::Opened(0x0102_0304_0506_0708),
            Frame::Stdout(b"hello\r\n".to_vec()),
            Frame::Stderr(vec![0xff; 20_000]),
            Frame::Stdout(Vec::new()),
            Frame::Exit(-3),
            Frame::Error("idle".into()),
            Frame::Text("offset 42".into()),
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        for step in [1, 2, 3, 7, 4096, bytes.len()] {
            let mut r = FrameReader::default();
            let mut got = Vec::new();
            for piece in bytes.chunks(step) {
                r.push(piece);
                while let Some(f) = r.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "split every {step} bytes");
        }
        // Any bytes in any pieces: frames or a refusal, never a panic.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let len = (next() % 64) as usize;
            let junk: Vec<u8> =
                (0..len).map(|_| if next() % 3 == 0 { (next() % 7) as u8 } else { next() as u8 }).collect();
            let mut r = FrameReader::default();
            for piece in junk.chunks(1 + (next() % 8) as usize) {
                r.push(piece);
                while let Ok(Some(_)) = r.next_frame() {}
            }
        }
        for bad in [&[9u8, 0, 0, 0, 0][..], &[4, 0, 0, 0, 2, 0, 0], &[1, 0xff, 0xff, 0xff, 0xff]] {
            let mut r = FrameReader::default();
            r.push(bad);
            assert!(r.next_frame().is_err(), "{bad:?} accepted");
        }
    }
}
