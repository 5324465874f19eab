//! The OCI (and Docker v2) JSON documents an image is made of, and choosing
//! the manifest for this device's platform from an index.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Digest, ImageError};

pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The whole image name `docker save` and containerd put beside a bare-tag ref.name.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// This device's platform in OCI terms.
    pub fn current() -> Self {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", None),
            "arm" => ("arm", Some("v7")),
            other => (other, None),
        };
        Self { architecture: architecture.into(), os: "linux".into(), variant: variant.map(Into::into) }
    }

    /// Whether an image built for `other` runs here. arm64 images without a
    /// variant (or `v8`) match arm64; 32-bit ARM must match its variant.
    pub fn accepts(&self, other: &Platform) -> bool {
        if self.os != other.os || self.architecture != other.architecture {
            return false;
        }
        match (self.variant.as_deref(), other.variant.as_deref()) {
            (_, None) => true,
            (None, Some(v)) => self.architecture == "arm64" && v == "v8",
            (Some(a), Some(b)) => a == b,
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// The parts of an image config a container uses.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: RunConfig,
    #[serde(default)]
    pub rootfs: RootfsConfig,
}

/// The config's `rootfs`: each layer's uncompressed digest, in order.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RootfsConfig {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

/// Either kind of document a reference can point at.
pub enum Document {
    Index(Index),
    Manifest(Manifest),
}

/// Parses manifest or index JSON, by media type when given, else by shape.
pub fn parse_document(media_type: &str, bytes: &[u8]) -> Result<Document, ImageError> {
    let bad = |e: serde_json::Error| ImageError::Invalid(format!("unreadable image manifest or index: {e}"));
    match media_type {
        MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST => Ok(Document::Index(serde_json::from_slice(bytes).map_err(bad)?)),
        MEDIA_OCI_MANIFEST | MEDIA_DOCKER_MANIFEST => {
            Ok(Document::Manifest(serde_json::from_slice(bytes).map_err(bad)?))
        }
        _ => {
            let v: serde_json::Value = serde_json::from_slice(bytes).map_err(bad)?;
            if v.get("manifests").is_some() {
                Ok(Document::Index(serde_json::from_value(v).map_err(bad)?))
            } else {
                Ok(Document::Manifest(serde_json::from_value(v).map_err(bad)?))
            }
        }
    }
}

/// The manifest descriptor in `index` for `platform`; a clear error naming
/// what the index offers when nothing matches.
pub fn select_platform<'a>(index: &'a Index, platform: &Platform, what: &str) -> Result<&'a Descriptor, ImageError> {
    let candidates: Vec<&Descriptor> = index.manifests.iter().filter(|d| d.platform.is_some()).collect();
    if candidates.is_empty() && index.manifests.len() == 1 {
        return Ok(&index.manifests[0]); // a single untagged manifest: take it
    }
    candidates.iter().find(|d| d.platform.as_ref().is_some_and(|p| platform.accepts(p))).copied().ok_or_else(|| {
        ImageError::NoPlatform {
            platform: platform.to_string(),
            what: what.to_string(),
            available: candidates
                .iter()
                .filter_map(|d| d.platform.as_ref().map(ToString::to_string))
                .collect::<Vec<_>>()
                .join(", "),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(arch: &str, variant: Option<&str>, n: char) -> Descriptor {
        Descriptor {
            media_type: MEDIA_OCI_MANIFEST.into(),
            digest: Digest::parse(&format!("sha256:{}", n.to_string().repeat(64))).unwrap(),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: variant.map(Into::into),
            }),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn picks_the_device_platform_and_explains_a_miss() {
        let index = Index {
            media_type: None,
            manifests: vec![
                desc("amd64", None, 'a'),
                desc("arm64", Some("v8"), 'b'),
                desc("arm", Some("v6"), 'c'),
                desc("arm", Some("v7"), 'd'),
            ],
        };
        let pick = |arch: &str, variant: Option<&str>| {
            let p = Platform { architecture: arch.into(), os: "linux".into(), variant: variant.map(Into::into) };
            select_platform(&index, &p, "test").map(|d| d.digest.hex().chars().next().unwrap())
        };
        assert_eq!(pick("amd64", None).unwrap(), 'a');
        assert_eq!(pick("arm64", None).unwrap(), 'b');
        assert_eq!(pick("arm", Some("v7")).unwrap(), 'd');
        let e = pick("riscv64", None).unwrap_err().to_string();
        assert!(e.contains("linux/riscv64") && e.contains("linux/arm/v7") && e.contains("linux/amd64"), "{e}");
    }
}
