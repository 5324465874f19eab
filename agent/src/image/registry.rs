//! Pulling images into the local store through `baton-registry` (the
//! registry protocol and auth live there, shared with the controller):
//! platform choice from indexes, and blob downloads that resume where they
//! broke (HTTP Range) and are verified before use. Blocking: pulls run on
//! their own thread.

use std::io::Read;

pub use baton_registry::{Reference, RegistryConfig, RegistryError};

use super::manifest::{self, Document, ImageConfig, Platform};
use super::{Digest, ImageError, ImageRecord, ImageStore};

impl From<RegistryError> for ImageError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(what) => ImageError::NotInRegistry(what),
            RegistryError::DigestMismatch { expected, actual } => {
                match (Digest::parse(&expected), Digest::parse(&actual)) {
                    (Ok(expected), Ok(actual)) => ImageError::DigestMismatch { expected, actual },
                    _ => ImageError::Invalid(format!("manifest {expected} hashes to {actual}")),
                }
            }
            RegistryError::Invalid(why) => ImageError::Invalid(why),
            RegistryError::Io { context, source } => ImageError::Io { context, source },
        }
    }
}

/// What a pull did, for reports and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullStats {
    pub blobs_fetched: u32,
    pub bytes_downloaded: u64,
}

pub struct Registry {
    client: baton_registry::Client,
}

impl Registry {
    pub fn new(config: RegistryConfig) -> Self {
        Self { client: baton_registry::Client::new(config) }
    }

    /// Fetches a manifest or index, verifies it (against the digest asked
    /// for, when there was one) and stores it; returns its digest and bytes.
    fn fetch_document(
        &self,
        store: &ImageStore,
        r: &Reference,
        reference: &str,
    ) -> Result<(Digest, String, Vec<u8>), ImageError> {
        let fetched = self.client.manifest(r, reference)?;
        let digest = Digest::parse(&fetched.digest)?;
        store.put_blob(&fetched.bytes[..], &digest, Some(fetched.bytes.len() as u64))?;
        Ok((digest, fetched.media_type, fetched.bytes))
    }

    fn fetch_blob(
        &self,
        store: &ImageStore,
        r: &Reference,
        d: &Digest,
        size: u64,
        stats: &mut PullStats,
    ) -> Result<(), ImageError> {
        if store.has_blob(d) {
            return Ok(());
        }
        let path = format!("blobs/{d}");
        let n = store.put_blob_resumable(d, size, |from| {
            let res = self.client.get(r, &path, None, from)?;
            let honoured = res.status().as_u16() == 206;
            Ok((honoured, Box::new(res.into_body().into_reader()) as Box<dyn Read>))
        })?;
        stats.blobs_fetched += 1;
        stats.bytes_downloaded += n;
        Ok(())
    }

    /// Pulls `reference` for `platform` into `store` (only what it lacks);
    /// the caller unpacks and records it (an image is recorded only once usable).
    pub fn pull(
        &self,
        store: &ImageStore,
        reference: &str,
        platform: &Platform,
    ) -> Result<(ImageRecord, PullStats), ImageError> {
        let r = Reference::parse(reference)?;
        let mut stats = PullStats::default();
        let (mut digest, mut media_type, mut bytes) = self.fetch_document(store, &r, &r.reference())?;
        // What the tag (or pinned digest) names: an index, for a multi-arch image.
        let top = digest.clone();
        let manifest = loop {
            match manifest::parse_document(&media_type, &bytes)? {
                Document::Manifest(m) => break m,
                Document::Index(index) => {
                    let chosen = manifest::select_platform(&index, platform, reference)?.digest.clone();
                    (digest, media_type, bytes) = self.fetch_document(store, &r, chosen.as_str())?;
                }
            }
        };
        // The config first (small): its diff_ids say which layers are already
        // unpacked here (from any image, compressed any way): those are not
        // downloaded again.
        self.fetch_blob(store, &r, &manifest.config.digest, manifest.config.size, &mut stats)?;
        let config: ImageConfig = serde_json::from_slice(&store.read_document(&manifest.config.digest)?)
            .map_err(|e| ImageError::Invalid(format!("image config {}: {e}", manifest.config.digest)))?;
        let ids = super::store::diff_ids(&config, manifest.layers.len());
        let unpacked = |i: usize| ids.get(i).is_some_and(|d| store.layer_path(d).is_dir());
        let needed: Vec<&manifest::Descriptor> = manifest
            .layers
            .iter()
            .enumerate()
            .filter(|(i, l)| !unpacked(*i) && !store.layer_path(&l.digest).is_dir())
            .map(|(_, l)| l)
            .collect();
        // Fail before downloading a layer when the image cannot fit: what is
        // missing, plus (at least) as much again to unpack it.
        let missing: u64 = needed.iter().filter(|d| !store.has_blob(&d.digest)).map(|d| d.size).sum();
        let to_unpack: u64 = needed.iter().map(|l| l.size).sum();
        store.room(missing.saturating_add(to_unpack), &format!("image {reference}"))?;
        let written: Vec<Digest> =
            needed.iter().filter(|d| !store.has_blob(&d.digest)).map(|d| d.digest.clone()).collect();
        let fetched = (|| {
            for layer in &needed {
                self.fetch_blob(store, &r, &layer.digest, layer.size, &mut stats)?;
            }
            Ok(())
        })();
        if let Err(e) = fetched {
            if matches!(e, ImageError::NoSpace { .. }) {
                store.forget_unreferenced(&written);
            }
            return Err(e);
        }
        let record = ImageRecord {
            reference: reference.to_string(),
            index: (digest != top).then_some(top),
            manifest: digest,
            config,
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            config_digest: Some(manifest.config.digest.clone()),
            imported_at: crate::runtime::now_ms(),
        };
        Ok((record, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_errors_keep_their_meaning() {
        let e: ImageError = RegistryError::NotFound("r/x: manifests/1".into()).into();
        assert_eq!(e.to_string(), "the registry has no r/x: manifests/1");
        let (a, b) = (format!("sha256:{}", "a".repeat(64)), format!("sha256:{}", "b".repeat(64)));
        let e: ImageError = RegistryError::DigestMismatch { expected: a, actual: b }.into();
        assert!(matches!(e, ImageError::DigestMismatch { .. }));
    }
}
