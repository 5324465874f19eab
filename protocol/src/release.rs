//! Since 1.6: agent releases — how a device learns which agent build to run,
//! fetches it over its own MQTT link, and says how the switch went.
//!
//! The controller names the build in the device's (signed) desired document
//! ([`AgentTarget`]: version, SHA-256 and size of the binary for the device's
//! architecture). The device asks for the bytes piece by piece on `release`
//! ([`ReleaseRequest`]: digest, offset, length) and gets them on
//! `release/res` ([`ReleaseChunk`]); it resumes from what it has after a cut,
//! and checks the whole file against the signed digest before anything
//! changes. The outcome travels in its inventory ([`UpgradeOutcome`]).

use serde::{Deserialize, Serialize};

/// The most bytes one [`ReleaseChunk`] carries: well under every broker's
/// message limit we configure (300 KiB), small enough that a device holds
/// one in memory at a time.
pub const CHUNK_BYTES: u32 = 64 * 1024;

/// In `Desired::agent`: the agent this device should run.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AgentTarget {
    pub version: String,
    /// SHA-256 of the binary for this device's architecture. Empty: a
    /// version the device keeps itself (the one it ran before this upgrade),
    /// to go back to without a download.
    pub digest: Vec<u8>,
    pub size: u64,
    /// The controller's number for the upgrade that asks: a build that
    /// failed on the device is tried again only when a new upgrade asks.
    pub rollout: u64,
    /// The operator asked for this even if it is older than what runs
    /// (undo, or the fleet rolled back); otherwise a device never downgrades.
    pub downgrade: bool,
}

/// `release`, device → controller: `len` bytes of the release `digest` from `offset`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ReleaseRequest {
    pub digest: Vec<u8>,
    pub offset: u64,
    pub len: u32,
}

/// `release/res`, controller → device: the bytes asked for (at most
/// [`CHUNK_BYTES`]), or why not.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct ReleaseChunk {
    pub digest: Vec<u8>,
    pub offset: u64,
    /// The whole release's size.
    pub total: u64,
    /// As postcard bytes (the same encoding as a `Vec<u8>`), copied whole
    /// rather than byte by byte.
    #[serde(with = "bytes")]
    pub data: Vec<u8>,
    pub error: Option<String>,
}

/// `Vec<u8>` through serde's bytes methods: the wire form of a sequence of
/// `u8` in postcard (a length, then the bytes), without a call per byte.
mod bytes {
    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> de::Visitor<'de> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(Bytes)
    }
}

/// How the last upgrade a device was asked for went (in `Inventory::upgrade`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UpgradeOutcome {
    /// The version it was asked to run.
    pub version: String,
    /// `AgentTarget::rollout` of the request.
    pub rollout: u64,
    pub state: UpgradeState,
    /// Why, for anything but `Upgraded`.
    pub detail: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum UpgradeState {
    /// Fetching or trying it.
    #[default]
    InProgress,
    /// Runs it.
    Upgraded,
    /// Tried it; it did not come online in time, so the device went back.
    RolledBack,
    /// Did not try it: wrong architecture, bad digest, a downgrade not asked for, no room…
    Refused,
}

impl UpgradeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "in-progress",
            Self::Upgraded => "upgraded",
            Self::RolledBack => "rolled-back",
            Self::Refused => "refused",
        }
    }
}

/// Orders agent versions (`0.10.2` after `0.9.7`; a pre-release such as
/// `1.0.0-rc1` before `1.0.0`); `None` when either is not `N.N.N[-pre][+build]`.
pub fn compare_versions(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    fn parse(v: &str) -> Option<([u64; 3], Option<&str>)> {
        let v = v.split('+').next()?;
        let (core, pre) = match v.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (v, None),
        };
        let mut n = [0u64; 3];
        let mut parts = core.split('.');
        for slot in &mut n {
            *slot = parts.next()?.parse().ok()?;
        }
        parts.next().is_none().then_some((n, pre))
    }
    let (na, pa) = parse(a)?;
    let (nb, pb) = parse(b)?;
    Some(na.cmp(&nb).then_with(|| match (pa, pb) {
        (None, None) => std::cmp::Ordering::Equal,
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (Some(x), Some(y)) => x.cmp(y),
    }))
}

/// Marks the agent's version inside its binary: `\0baton-agent-version=`,
/// then the version, padded with NULs to [`VERSION_STAMP_LEN`] bytes. `baton
/// agent publish` reads it from the file; the agent reports what is there.
/// Kept masked here so that the only copy of these bytes in any binary is a
/// stamp: [`stamp_prefix`] builds them at compile time (for the stamp),
/// [`version_stamp_prefix`] at run time (for the search).
const PREFIX_MASKED: [u8; VERSION_STAMP_PREFIX_LEN] = mask(*b"\0baton-agent-version=", 0x5a);
pub const VERSION_STAMP_PREFIX_LEN: usize = 21;
pub const VERSION_STAMP_LEN: usize = 64;

const fn mask(mut bytes: [u8; VERSION_STAMP_PREFIX_LEN], key: u8) -> [u8; VERSION_STAMP_PREFIX_LEN] {
    let mut i = 0;
    while i < bytes.len() {
        bytes[i] ^= key;
        i += 1;
    }
    bytes
}

/// The stamp's prefix, for a stamp built at compile time.
pub const fn stamp_prefix() -> [u8; VERSION_STAMP_PREFIX_LEN] {
    mask(PREFIX_MASKED, 0x5a)
}

/// The stamp's prefix, built at run time (the key is opaque to the
/// optimiser, so the plain bytes are not a constant of the program).
pub fn version_stamp_prefix() -> [u8; VERSION_STAMP_PREFIX_LEN] {
    mask(PREFIX_MASKED, std::hint::black_box(0x5a))
}

/// The version stamped in an agent binary, if it has one.
pub fn find_version_stamp(binary: &[u8]) -> Option<&str> {
    let prefix = version_stamp_prefix();
    let at = binary.windows(prefix.len()).position(|w| w == prefix)?;
    let field = binary.get(at + prefix.len()..)?;
    let field = &field[..field.len().min(VERSION_STAMP_LEN)];
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    std::str::from_utf8(&field[..end]).ok().filter(|v| !v.is_empty())
}

/// The CPU an ELF executable is for, as Rust names it (`x86_64`, `aarch64`,
/// `arm`), from its header; `None` for anything else.
pub fn elf_arch(binary: &[u8]) -> Option<&'static str> {
    if binary.get(..4)? != b"\x7fELF" {
        return None;
    }
    // EI_CLASS (1: 32-bit, 2: 64-bit), EI_DATA (1: little-endian), e_machine at 18.
    let (class, data) = (*binary.get(4)?, *binary.get(5)?);
    let machine = u16::from_le_bytes([*binary.get(18)?, *binary.get(19)?]);
    match (class, data, machine) {
        (2, 1, 0x3e) => Some("x86_64"),
        (2, 1, 0xb7) => Some("aarch64"),
        (1, 1, 0x28) => Some("arm"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering::*;

    #[test]
    fn chunk_data_encodes_as_a_byte_sequence_would() {
        #[derive(Serialize)]
        struct Plain {
            digest: Vec<u8>,
            offset: u64,
            total: u64,
            data: Vec<u8>,
            error: Option<String>,
        }
        let chunk = ReleaseChunk { digest: vec![1; 32], offset: 7, total: 9, data: (0..=255).collect(), error: None };
        let plain = Plain { digest: vec![1; 32], offset: 7, total: 9, data: (0..=255).collect(), error: None };
        let bytes = postcard::to_allocvec(&chunk).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&plain).unwrap());
        assert_eq!(postcard::from_bytes::<ReleaseChunk>(&bytes).unwrap(), chunk);
    }

    #[test]
    fn stamps_and_elf_headers_read_from_bytes() {
        assert_eq!(&version_stamp_prefix(), b"\0baton-agent-version=");
        assert_eq!(stamp_prefix(), version_stamp_prefix());
        let mut bin = b"junk".to_vec();
        bin.extend_from_slice(&version_stamp_prefix());
        bin.extend_from_slice(b"1.2.3-rc1");
        bin.resize(bin.len() + 20, 0);
        assert_eq!(find_version_stamp(&bin), Some("1.2.3-rc1"));
        assert_eq!(find_version_stamp(b"no stamp here"), None);
        let mut empty = version_stamp_prefix().to_vec();
        empty.push(0);
        assert_eq!(find_version_stamp(&empty), None);
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        (elf[4], elf[5], elf[18]) = (2, 1, 0xb7);
        assert_eq!(elf_arch(&elf), Some("aarch64"));
        (elf[4], elf[18]) = (1, 0x28);
        assert_eq!(elf_arch(&elf), Some("arm"));
        elf[4] = 2;
        assert_eq!(elf_arch(&elf), None, "a 64-bit header with a 32-bit machine");
        assert_eq!(elf_arch(b"#!/bin/sh\n"), None);
        assert_eq!(elf_arch(b"\x7fEL"), None);
    }

    #[test]
    fn versions_order_numerically_with_pre_releases_first() {
        assert_eq!(compare_versions("0.10.2", "0.9.7"), Some(Greater));
        assert_eq!(compare_versions("1.0.0-rc1", "1.0.0"), Some(Less));
        assert_eq!(compare_versions("1.0.0+abc", "1.0.0"), Some(Equal));
        assert_eq!(compare_versions("1.0.0-b", "1.0.0-a"), Some(Greater));
        assert_eq!(compare_versions("1.0", "1.0.0"), None);
        assert_eq!(compare_versions("v1.0.0", "1.0.0"), None);
        assert_eq!(compare_versions("1.0.0.1", "1.0.0"), None);
    }
}
