//! OCI images on the device: a content-addressed blob store where every byte
//! is verified against its digest before use, import of OCI image layouts
//! (directory or tarball, for air-gapped devices), and each layer unpacked
//! once, shared by the images that have it, which containers use read-only
//! (each gets its own writable layer).
//!
//! Registry pulls build on the same store (see the images issue).

pub mod archive;
pub mod manifest;
pub mod puller;
pub mod registry;
pub mod source;
pub mod space;
pub mod store;
pub mod unpack;
pub mod user;

pub use store::{GcStats, ImageRecord, ImageStore};

use std::fmt;

/// A `sha256:<64 lowercase hex>` content digest, the only algorithm accepted.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Self, ImageError> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| ImageError::BadDigest(s.to_string()))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(ImageError::BadDigest(s.to_string()));
        }
        Ok(Self(s.to_string()))
    }

    pub fn from_sha256(bytes: &[u8]) -> Self {
        let mut hex = String::with_capacity(71);
        hex.push_str("sha256:");
        for b in bytes {
            hex.push_str(&format!("{b:02x}"));
        }
        Self(hex)
    }

    /// The hex part, safe as a file name.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Digest {
    type Error = ImageError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid digest {0:?}: expected sha256:<64 hex digits>")]
    BadDigest(String),
    #[error("blob {expected} is corrupt: its content hashes to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob {digest} is {actual} bytes, its descriptor says {expected}")]
    SizeMismatch { digest: Digest, expected: u64, actual: u64 },
    #[error("{0}")]
    Invalid(String),
    #[error("no image for platform {platform} in {what}; it has: {available}")]
    NoPlatform { platform: String, what: String, available: String },
    #[error("layer refused: {0}")]
    UnsafeLayer(String),
    #[error("image {0} is not in the local store")]
    NotFound(String),
    /// The registry answered 404 (a repository, tag or blob it does not have).
    #[error("the registry has no {0}")]
    NotInRegistry(String),
    #[error(
        "no space on the data disk for {what}: it needs {} MiB, {} MiB are free and {} MiB of them are kept for the agent's own state (free space, or lower what runs here)",
        mib(*needed), mib(*free), mib(*reserve)
    )]
    NoSpace { what: String, needed: u64, free: u64, reserve: u64 },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

impl ImageError {
    /// An I/O error with `context` where it had none.
    fn within(self, context: &str) -> Self {
        match self {
            ImageError::Io { context: c, source } if c.is_empty() => ImageError::Io { context: context.into(), source },
            other => other,
        }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
        let context = context.into();
        move |source| ImageError::Io { context, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_strict() {
        let ok = format!("sha256:{}", "a".repeat(64));
        assert_eq!(Digest::parse(&ok).unwrap().hex(), "a".repeat(64));
        for bad in
            ["", "sha256:", "md5:abc", &format!("sha256:{}", "A".repeat(64)), &format!("sha256:{}/..", "a".repeat(61))]
        {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }
}
