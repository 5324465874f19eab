//! The wire format: a 3-byte envelope, then the postcard-encoded message.
//!
//! ```text
//! byte 0: protocol major (1)   byte 1: protocol minor   byte 2: message kind
//! bytes 3..: postcard body
//! ```
//!
//! Compatibility rule inside one major version: a new minor version may only
//! append fields at the end of a top-level message, and each new field's
//! default must encode as zero bytes in postcard (`Option::None`, an empty
//! `Vec`/`String`, `0`, `false`, or an enum whose first variant is the default).
//! Then both directions work:
//! - a newer peer's extra trailing bytes are ignored by an older decoder;
//! - an older peer's shorter body is padded with zero bytes by a newer decoder,
//!   so the missing fields read as their defaults.
//!
//! New enum variants are not readable by older peers: they get
//! [`DecodeError::Body`], as for any other bad input. Decoding never panics.

use serde::{de::DeserializeOwned, Serialize};

use crate::message::*;
use crate::topic::TopicKind;
use crate::{PROTOCOL_MAJOR, PROTOCOL_MINOR};

pub const HEADER_LEN: usize = 3;

/// No message of any kind may be larger; checked before anything is decoded.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Zero bytes appended to bodies from older minor versions; more than the
/// encoded default of every field a minor version might append.
const OLD_MINOR_PADDING: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageKind {
    Presence = 1,
    Inventory = 2,
    Heartbeat = 3,
    Report = 4,
    Desired = 5,
    Command = 6,
    CommandResult = 7,
    /// Since 1.2.
    SignedDesired = 8,
    /// Since 1.2.
    EnrollRequest = 9,
    /// Since 1.2.
    EnrollResponse = 10,
    /// Since 1.6.
    ReleaseRequest = 11,
    /// Since 1.6.
    ReleaseChunk = 12,
}

impl MessageKind {
    pub const ALL: [MessageKind; 12] = [
        Self::Presence,
        Self::Inventory,
        Self::Heartbeat,
        Self::Report,
        Self::Desired,
        Self::Command,
        Self::CommandResult,
        Self::SignedDesired,
        Self::EnrollRequest,
        Self::EnrollResponse,
        Self::ReleaseRequest,
        Self::ReleaseChunk,
    ];

    /// The minor version that introduced this kind.
    pub fn since_minor(self) -> u8 {
        match self {
            Self::SignedDesired | Self::EnrollRequest | Self::EnrollResponse => 2,
            Self::ReleaseRequest | Self::ReleaseChunk => 6,
            _ => 0,
        }
    }

    pub fn from_byte(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u8 == b)
    }

    /// The largest encoded message of this kind a peer accepts.
    pub fn max_size(self) -> usize {
        match self {
            Self::Presence => 1024,
            // 512 B before 1.8; loads of autoscaled workloads take more.
            Self::Heartbeat => 8 * 1024,
            Self::Inventory | Self::Command => 16 * 1024,
            Self::Report | Self::CommandResult => 64 * 1024,
            // Room for the signature wrapper around a desired document.
            Self::Desired => MAX_MESSAGE_BYTES - 1024,
            Self::SignedDesired => MAX_MESSAGE_BYTES,
            Self::EnrollRequest | Self::EnrollResponse => 1024,
            Self::ReleaseRequest => 256,
            Self::ReleaseChunk => crate::release::CHUNK_BYTES as usize + 1024,
        }
    }

    /// The topic on which this kind travels.
    pub fn topic(self) -> TopicKind {
        match self {
            Self::Presence => TopicKind::Presence,
            Self::Inventory => TopicKind::Inventory,
            Self::Heartbeat => TopicKind::Heartbeat,
            Self::Report => TopicKind::Report,
            Self::Desired | Self::SignedDesired => TopicKind::Desired,
            Self::Command => TopicKind::Cmd,
            Self::CommandResult => TopicKind::CmdRes,
            Self::EnrollRequest => TopicKind::Enroll,
            Self::EnrollResponse => TopicKind::EnrollRes,
            Self::ReleaseRequest => TopicKind::Release,
            Self::ReleaseChunk => TopicKind::ReleaseRes,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Presence => "presence",
            Self::Inventory => "inventory",
            Self::Heartbeat => "heartbeat",
            Self::Report => "report",
            Self::Desired => "desired",
            Self::Command => "command",
            Self::CommandResult => "command-result",
            Self::SignedDesired => "signed-desired",
            Self::EnrollRequest => "enroll-request",
            Self::EnrollResponse => "enroll-response",
            Self::ReleaseRequest => "release-request",
            Self::ReleaseChunk => "release-chunk",
        }
    }
}

impl Message {
    pub fn kind(&self) -> MessageKind {
        match self {
            Self::Presence(_) => MessageKind::Presence,
            Self::Inventory(_) => MessageKind::Inventory,
            Self::Heartbeat(_) => MessageKind::Heartbeat,
            Self::Report(_) => MessageKind::Report,
            Self::Desired(_) => MessageKind::Desired,
            Self::Command(_) => MessageKind::Command,
            Self::CommandResult(_) => MessageKind::CommandResult,
            Self::SignedDesired(_) => MessageKind::SignedDesired,
            Self::EnrollRequest(_) => MessageKind::EnrollRequest,
            Self::EnrollResponse(_) => MessageKind::EnrollResponse,
            Self::ReleaseRequest(_) => MessageKind::ReleaseRequest,
            Self::ReleaseChunk(_) => MessageKind::ReleaseChunk,
        }
    }
}

/// The header of a decoded message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    pub major: u8,
    pub minor: u8,
    pub kind: MessageKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {len} bytes exceeds the {max}-byte limit for {kind}")]
    TooLarge { len: usize, max: usize, kind: &'static str },
    #[error("message of {0} bytes is shorter than the {HEADER_LEN}-byte envelope")]
    Truncated(usize),
    #[error("protocol major version {0} is not supported (this build speaks {PROTOCOL_MAJOR})")]
    UnsupportedMajor(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("bad {kind} body: {error}")]
    Body { kind: &'static str, error: postcard::Error },
    #[error("{1} body has {0} unexpected trailing bytes")]
    TrailingBytes(usize, &'static str),
    #[error("expected a {expected} message on this topic, got {got}")]
    WrongKind { expected: &'static str, got: &'static str },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("encoded {kind} is {len} bytes, over its {max}-byte limit")]
    TooLarge { len: usize, max: usize, kind: &'static str },
    #[error("cannot encode {kind}: {error}")]
    Serialize { kind: &'static str, error: postcard::Error },
}

/// Encodes `msg` with the current protocol version.
pub fn encode(msg: &Message) -> Result<Vec<u8>, EncodeError> {
    let kind = msg.kind();
    let header = vec![PROTOCOL_MAJOR, PROTOCOL_MINOR, kind as u8];
    let out = match msg {
        Message::Presence(m) => append(header, m),
        Message::Inventory(m) => append(header, m),
        Message::Heartbeat(m) => append(header, m),
        Message::Report(m) => append(header, m),
        Message::Desired(m) => append(header, m),
        Message::Command(m) => append(header, m),
        Message::CommandResult(m) => append(header, m),
        Message::SignedDesired(m) => append(header, m),
        Message::ReleaseRequest(m) => append(header, m),
        Message::ReleaseChunk(m) => append(header, m),
        Message::EnrollRequest(m) => append(header, m),
        Message::EnrollResponse(m) => append(header, m),
    }
    .map_err(|error| EncodeError::Serialize { kind: kind.name(), error })?;
    if out.len() > kind.max_size() {
        return Err(EncodeError::TooLarge { len: out.len(), max: kind.max_size(), kind: kind.name() });
    }
    Ok(out)
}

fn append<T: Serialize>(header: Vec<u8>, body: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_extend(body, header)
}

/// Reads and checks the envelope without decoding the body.
pub fn peek(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge { len: bytes.len(), max: MAX_MESSAGE_BYTES, kind: "any" });
    }
    let [major, minor, kind, ..] = *bytes else {
        return Err(DecodeError::Truncated(bytes.len()));
    };
    if major != PROTOCOL_MAJOR {
        return Err(DecodeError::UnsupportedMajor(major));
    }
    let kind = MessageKind::from_byte(kind).ok_or(DecodeError::UnknownKind(kind))?;
    if bytes.len() > kind.max_size() {
        return Err(DecodeError::TooLarge { len: bytes.len(), max: kind.max_size(), kind: kind.name() });
    }
    Ok(Envelope { major, minor, kind })
}

/// Decodes any message. Never panics, whatever `bytes` holds.
pub fn decode(bytes: &[u8]) -> Result<(Envelope, Message), DecodeError> {
    let env = peek(bytes)?;
    let body = &bytes[HEADER_LEN..];
    let msg = match env.kind {
        MessageKind::Presence => Message::Presence(decode_body(env, body)?),
        MessageKind::Inventory => Message::Inventory(decode_body(env, body)?),
        MessageKind::Heartbeat => Message::Heartbeat(decode_body(env, body)?),
        MessageKind::Report => Message::Report(decode_body(env, body)?),
        MessageKind::Desired => Message::Desired(decode_body(env, body)?),
        MessageKind::Command => Message::Command(decode_body(env, body)?),
        MessageKind::CommandResult => Message::CommandResult(decode_body(env, body)?),
        MessageKind::SignedDesired => Message::SignedDesired(decode_body(env, body)?),
        MessageKind::EnrollRequest => Message::EnrollRequest(decode_body(env, body)?),
        MessageKind::EnrollResponse => Message::EnrollResponse(decode_body(env, body)?),
        MessageKind::ReleaseRequest => Message::ReleaseRequest(decode_body(env, body)?),
        MessageKind::ReleaseChunk => Message::ReleaseChunk(decode_body(env, body)?),
    };
    Ok((env, msg))
}

/// Decodes a message received on a topic of `expected` kind, refusing others.
pub fn decode_on(topic: TopicKind, bytes: &[u8]) -> Result<(Envelope, Message), DecodeError> {
    let env = peek(bytes)?;
    if env.kind.topic() != topic {
        let expected = MessageKind::ALL.into_iter().find(|k| k.topic() == topic).map_or("none", MessageKind::name);
        return Err(DecodeError::WrongKind { expected, got: env.kind.name() });
    }
    decode(bytes)
}

fn decode_body<T: DeserializeOwned>(env: Envelope, body: &[u8]) -> Result<T, DecodeError> {
    decode_body_as_minor(env, body, PROTOCOL_MINOR)
}

/// `decode_body` as a build speaking minor version `ours` would run it.
fn decode_body_as_minor<T: DeserializeOwned>(env: Envelope, body: &[u8], ours: u8) -> Result<T, DecodeError> {
    let kind = env.kind.name();
    let body_err = |error| DecodeError::Body { kind, error };
    if env.minor < ours {
        // Older peer: fields it does not know about read as zero bytes (their defaults).
        let mut padded = Vec::with_capacity(body.len() + OLD_MINOR_PADDING);
        padded.extend_from_slice(body);
        padded.resize(body.len() + OLD_MINOR_PADDING, 0);
        return postcard::take_from_bytes(&padded).map(|(v, _)| v).map_err(body_err);
    }
    let (value, rest) = postcard::take_from_bytes(body).map_err(body_err)?;
    if env.minor == ours && !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len(), kind));
    }
    // A newer minor appended fields we do not know: ignoring them is the contract.
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct HeartbeatV1_1 {
        seq: u32,
        uptime_s: u32,
        load1_centi: u32,
        mem_used_kib: u64,
        mem_total_kib: u64,
        disk_free_mib: u64,
        temp_milli_c: Option<i32>,
        applied_generation: u64,
        unix_ms: u64,
        loads: Vec<WorkloadLoad>,
        // Appended in the imaginary next minor:
        throttled: Option<u32>,
        zones: Vec<String>,
    }

    fn hb() -> Heartbeat {
        Heartbeat {
            seq: 7,
            uptime_s: 3600,
            load1_centi: 42,
            mem_used_kib: 100_000,
            mem_total_kib: 900_000,
            disk_free_mib: 5000,
            temp_milli_c: Some(51_000),
            applied_generation: 3,
            unix_ms: 1_700_000_000_000,
            loads: Vec::new(),
        }
    }

    #[test]
    fn older_decoder_ignores_fields_a_newer_minor_appended() {
        let newer = HeartbeatV1_1 {
            seq: 7,
            uptime_s: 3600,
            load1_centi: 42,
            mem_used_kib: 100_000,
            mem_total_kib: 900_000,
            disk_free_mib: 5000,
            temp_milli_c: Some(51_000),
            applied_generation: 3,
            unix_ms: 1_700_000_000_000,
            loads: Vec::new(),
            throttled: Some(1),
            zones: vec!["cpu".into()],
        };
        let mut bytes = vec![PROTOCOL_MAJOR, PROTOCOL_MINOR + 1, MessageKind::Heartbeat as u8];
        bytes.extend(postcard::to_allocvec(&newer).unwrap());
        let (env, msg) = decode(&bytes).unwrap();
        assert_eq!(env.minor, PROTOCOL_MINOR + 1);
        assert_eq!(msg, Message::Heartbeat(hb()));
    }

    #[test]
    fn newer_decoder_reads_older_minor_with_defaults_for_appended_fields() {
        let old = encode(&Message::Heartbeat(hb())).unwrap();
        let env = peek(&old).unwrap();
        let body = &old[HEADER_LEN..];
        // A v1.1 build decoding this v1.0 body: the appended fields read as defaults.
        let v: HeartbeatV1_1 = decode_body_as_minor(env, body, PROTOCOL_MINOR + 1).unwrap();
        assert_eq!((v.seq, v.applied_generation, v.throttled, v.zones.len()), (7, 3, None, 0));
        // Without the version difference the short body is an error, not a guess.
        assert!(decode_body_as_minor::<HeartbeatV1_1>(env, body, PROTOCOL_MINOR).is_err());
    }

    #[test]
    fn same_minor_trailing_bytes_are_refused() {
        let mut bytes = encode(&Message::Heartbeat(hb())).unwrap();
        bytes.push(0);
        assert!(matches!(decode(&bytes), Err(DecodeError::TrailingBytes(1, "heartbeat"))));
    }

    #[test]
    fn oversize_is_refused_before_decoding() {
        let mut bytes = vec![PROTOCOL_MAJOR, PROTOCOL_MINOR, MessageKind::Heartbeat as u8];
        bytes.resize(8 * 1024 + 1, 0);
        assert!(matches!(decode(&bytes), Err(DecodeError::TooLarge { max: 8192, .. })));
        let huge = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(decode(&huge), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn envelope_errors_are_typed() {
        assert_eq!(decode(&[1, 0]), Err(DecodeError::Truncated(2)));
        assert_eq!(decode(&[2, 0, 1]), Err(DecodeError::UnsupportedMajor(2)));
        assert_eq!(decode(&[1, 0, 99]), Err(DecodeError::UnknownKind(99)));
        let hb = encode(&Message::Heartbeat(hb())).unwrap();
        assert!(matches!(
            decode_on(TopicKind::Presence, &hb),
            Err(DecodeError::WrongKind { expected: "presence", got: "heartbeat" })
        ));
    }

    #[test]
    fn encode_refuses_messages_over_their_kind_limit() {
        let big = Desired {
            services: Vec::new(),
            issued_ms: 0,
            agent: None,
            service_ports: Vec::new(),
            load_reports: Vec::new(),
            updates: Vec::new(),
            generation: 1,
            workloads: vec![crate::spec::WorkloadSpec { name: "x".repeat(MAX_MESSAGE_BYTES), ..Default::default() }],
        };
        assert!(matches!(encode(&Message::Desired(big)), Err(EncodeError::TooLarge { .. })));
    }
}
