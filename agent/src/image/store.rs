//! The local image store: `blobs/sha256/<hex>` (every blob verified against
//! its digest before it is kept), `images.json` (what was imported, under
//! which reference), and `layers/<layer blob hex>/` (each layer unpacked once,
//! in overlayfs's format, and shared by every image that has it; built in a
//! temp dir and renamed into place, so a crash never leaves a half-unpacked
//! layer that looks complete). `rootfs/<manifest hex>/` holds whole-image
//! trees unpacked by agents before layers were shared; GC removes them with
//! their image.
//!
//! One file although long: every function here keeps the same on-disk
//! invariants (verified before kept, renamed into place, catalog and layer
//! dirs in step), and a split would spread them over files that must change together.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::manifest::{
    self, Descriptor, Document, ImageConfig, Platform, ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME,
};
use super::unpack::{apply_layer, unpack, Target};
use super::{Digest, ImageError};
use crate::runtime::layout::write_atomic;
use crate::runtime::rootfs::Rootfs;

/// Manifests, indexes and configs are small; anything bigger is refused unread.
const MAX_DOCUMENT: u64 = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The name it was last imported under (`registry/repo:tag`, or what the
    /// layout said); every name that points at it is in the catalog's tags.
    pub reference: String,
    /// This platform's manifest: what the image *is* here.
    pub manifest: Digest,
    /// The multi-platform index (manifest list) it was chosen from, when it
    /// was: the digest a controller pins a multi-arch tag to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<Digest>,
    pub config: ImageConfig,
    /// The layer blobs, as the manifest lists them (compressed digests).
    pub layers: Vec<Digest>,
    /// The config blob (kept by GC while the image is).
    #[serde(default)]
    pub config_digest: Option<Digest>,
    /// Unix ms of the import or pull; GC removes the oldest unused image first.
    #[serde(default)]
    pub imported_at: u64,
}

/// What a garbage collection removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcStats {
    pub images_removed: Vec<String>,
    pub blobs_removed: u32,
    pub bytes_freed: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Catalog {
    /// Manifest digest (hex) → record.
    images: BTreeMap<String, ImageRecord>,
    /// Name → manifest digest (hex). Several names may point at one image
    /// (`docker tag`); one name points at one image (the last one recorded).
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

/// The config's diff_ids when they are usable (one valid digest per layer);
/// empty otherwise (layers are then keyed by their blob digest).
pub fn diff_ids(config: &ImageConfig, layers: usize) -> Vec<Digest> {
    let ids: Vec<Digest> = config.rootfs.diff_ids.iter().filter_map(|d| Digest::parse(d).ok()).collect();
    if ids.len() == layers && config.rootfs.diff_ids.len() == layers {
        ids
    } else {
        Vec::new()
    }
}

/// How names are compared: by Docker's one spelling of each (`busybox` is
/// `registry-1.docker.io/library/busybox:latest`, so an image loaded as
/// `docker.io/apps/x:1` runs for a workload that says `apps/x:1`); a name
/// that is not a registry reference is compared as written.
fn tag_key(name: &str) -> String {
    baton_registry::Reference::parse(name).map_or_else(|_| name.to_string(), |r| r.canonical())
}

impl Catalog {
    /// Reads `images.json`; catalogs written before tags were kept get them
    /// from their records.
    fn parse(bytes: &[u8]) -> Option<Self> {
        let mut c: Catalog = serde_json::from_slice(bytes).ok()?;
        let untagged: Vec<(String, String)> = c
            .images
            .iter()
            .filter(|(_, r)| !c.tags.contains_key(&r.reference))
            .map(|(hex, r)| (r.reference.clone(), hex.clone()))
            .collect();
        c.tags.extend(untagged);
        c.tags.retain(|_, hex| c.images.contains_key(hex));
        Some(c)
    }

    /// The image a digest names: its manifest, or the index it was chosen from.
    fn by_digest(&self, d: &Digest) -> Option<&ImageRecord> {
        self.images.get(d.hex()).or_else(|| self.images.values().find(|r| r.index.as_ref() == Some(d)))
    }

    fn by_name(&self, reference: &str) -> Option<&ImageRecord> {
        let hex = self.tags.get(reference).or_else(|| {
            let key = tag_key(reference);
            self.tags.iter().find(|(name, _)| tag_key(name) == key).map(|(_, hex)| hex)
        })?;
        self.images.get(hex)
    }

    /// The names pointing at the image with manifest `hex`.
    fn names_of<'a>(&'a self, hex: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        self.tags.iter().filter(move |(_, h)| h.as_str() == hex).map(|(n, _)| n)
    }
}

pub struct ImageStore {
    root: PathBuf,
    platform: Platform,
    /// Free bytes the store never takes (the agent's own state needs them).
    reserve: u64,
}

/// A partial download untouched this long is abandoned (GC removes it).
const ABANDONED_PARTIAL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The entry of a layout of several tags that `name` (or its tag) names by
/// its `ref.name`; any of them when they are all one image.
fn by_ref_name<'a>(index: &'a manifest::Index, name: Option<&str>, what: &str) -> Result<&'a Descriptor, ImageError> {
    let first = &index.manifests[0];
    if index.manifests.iter().all(|d| d.digest == first.digest) {
        return Ok(first);
    }
    let refs: Vec<&str> =
        index.manifests.iter().filter_map(|d| d.annotations.get(ANNOTATION_REF_NAME).map(String::as_str)).collect();
    let tag = name.map(|n| n.rsplit_once(':').filter(|(_, t)| !t.contains('/')).map_or(n, |(_, t)| t));
    let wanted = |d: &&Descriptor| {
        d.annotations.get(ANNOTATION_REF_NAME).is_some_and(|r| Some(r.as_str()) == name || Some(r.as_str()) == tag)
    };
    index.manifests.iter().find(wanted).ok_or_else(|| {
        ImageError::Invalid(format!(
            "{what}/index.json holds {} different images (tags {}): load a layout with one tag, or pass --name \
             NAME:TAG with one of those tags",
            index.manifests.len(),
            refs.join(", ")
        ))
    })
}

impl ImageStore {
    /// Opens (or creates) the store. What a process that died left in `tmp/`
    /// goes (temp names carry their writer's pid); partial downloads stay,
    /// for the next pull to resume.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let root = root.into();
        for d in ["blobs/sha256", "layers", "tmp"] {
            fs::create_dir_all(root.join(d)).map_err(ImageError::io(format!("create {}", root.join(d).display())))?;
        }
        for left in fs::read_dir(root.join("tmp")).into_iter().flatten().flatten() {
            let name = left.file_name().to_string_lossy().into_owned();
            let writer = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
            if writer.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = super::unpack::remove_any(&left.path());
            }
        }
        Ok(Self { root, platform: Platform::current(), reserve: 0 })
    }

    /// Keeps `bytes` free on the data disk: what does not fit is refused.
    pub fn with_reserve(mut self, bytes: u64) -> Self {
        self.reserve = bytes;
        self
    }

    /// `Ok` when `needed` more bytes fit, leaving the reserve free.
    pub fn room(&self, needed: u64, what: &str) -> Result<(), ImageError> {
        super::space::check(&self.root, needed, self.reserve, what)
    }

    /// The error for a write that met a full disk (`Io` otherwise).
    fn write_error(&self, e: std::io::Error, needed: u64, what: &str, context: String) -> ImageError {
        if super::space::is_full(&e) {
            super::space::full(&self.root, needed, self.reserve, what)
        } else {
            ImageError::Io { context, source: e }
        }
    }

    /// Removes blobs a failed pull wrote that no recorded image references:
    /// a pull that cannot fit frees what it took.
    pub fn forget_unreferenced(&self, blobs: &[Digest]) {
        let catalog = self.catalog();
        for d in blobs {
            let used = catalog
                .images
                .values()
                .any(|r| r.manifest == *d || r.config_digest.as_ref() == Some(d) || r.layers.contains(d));
            if !used {
                let _ = fs::remove_file(self.blob_path(d));
            }
        }
    }

    /// For tests and tools that handle another device's images.
    pub fn with_platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    fn temp_path(&self, what: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        self.root.join("tmp").join(format!("{what}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
    }

    /// Streams `reader` into the store, hashing as it goes; keeps it only if
    /// it matches `expected` (and `size`, when known). A blob already present
    /// is not written again.
    pub fn put_blob(&self, mut reader: impl Read, expected: &Digest, size: Option<u64>) -> Result<u64, ImageError> {
        let dest = self.blob_path(expected);
        if dest.is_file() {
            return Ok(0);
        }
        let tmp = self.temp_path("blob");
        let result = (|| {
            let mut f = fs::File::create(&tmp).map_err(ImageError::io(format!("create {}", tmp.display())))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut written = 0u64;
            loop {
                let n = reader.read(&mut buf).map_err(ImageError::io(format!("read blob {expected}")))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                f.write_all(&buf[..n]).map_err(|e| {
                    self.write_error(
                        e,
                        size.unwrap_or(0),
                        &format!("blob {expected}"),
                        format!("write {}", tmp.display()),
                    )
                })?;
                written += n as u64;
                if size.is_some_and(|s| written > s) {
                    return Err(ImageError::SizeMismatch {
                        digest: expected.clone(),
                        expected: size.unwrap_or(0),
                        actual: written,
                    });
                }
            }
            let actual = Digest::from_sha256(&hasher.finalize());
            if &actual != expected {
                return Err(ImageError::DigestMismatch { expected: expected.clone(), actual });
            }
            if let Some(s) = size.filter(|s| *s != written) {
                return Err(ImageError::SizeMismatch { digest: expected.clone(), expected: s, actual: written });
            }
            f.sync_all().map_err(ImageError::io(format!("sync {}", tmp.display())))?;
            fs::rename(&tmp, &dest).map_err(ImageError::io(format!("store {}", dest.display())))?;
            Ok(written)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Downloads a blob that may arrive in pieces: `fetch(offset)` opens the
    /// source at `offset` and says whether it honoured the offset (an HTTP
    /// 206) or starts over (a 200). Bytes already on disk are never fetched
    /// again, across retries *and* across agent restarts (the partial file
    /// stays in `tmp/`). The digest is checked over the whole file before it
    /// is kept. Returns the bytes downloaded now.
    pub fn put_blob_resumable(
        &self,
        expected: &Digest,
        size: u64,
        mut fetch: impl FnMut(u64) -> Result<(bool, Box<dyn Read>), ImageError>,
    ) -> Result<u64, ImageError> {
        let dest = self.blob_path(expected);
        if dest.is_file() {
            return Ok(0);
        }
        let partial = self.root.join("tmp").join(format!("{}.partial", expected.hex()));
        let what = format!("blob {expected}");
        let have = fs::metadata(&partial).map_or(0, |m| m.len());
        self.room(size.saturating_sub(have), &what)?;
        let mut downloaded = 0u64;
        let mut failures = 0u32;
        loop {
            let offset = fs::metadata(&partial).map_or(0, |m| m.len());
            if offset > size {
                let _ = fs::remove_file(&partial);
                continue;
            }
            if offset == size {
                break;
            }
            // Where this attempt's bytes start: `offset` when the source resumed, 0 when it started over.
            let mut base = offset;
            let attempt = (|| -> Result<u64, ImageError> {
                let (honoured, mut reader) = fetch(offset)?;
                if !honoured {
                    base = 0;
                }
                let mut f = fs::OpenOptions::new()
                    .create(true)
                    .append(honoured)
                    .write(true)
                    .truncate(!honoured)
                    .open(&partial)
                    .map_err(ImageError::io(format!("open {}", partial.display())))?;
                let mut buf = vec![0u8; 64 * 1024];
                let mut n_total = 0;
                loop {
                    let n = reader.read(&mut buf).map_err(ImageError::io(format!("download {expected}")))?;
                    if n == 0 {
                        return Ok(n_total);
                    }
                    f.write_all(&buf[..n]).map_err(|e| {
                        self.write_error(e, size.saturating_sub(have), &what, format!("write {}", partial.display()))
                    })?;
                    n_total += n as u64;
                }
            })();
            // Count what reached the disk, whether the attempt finished or broke.
            let now = fs::metadata(&partial).map_or(0, |m| m.len());
            downloaded += now.saturating_sub(base);
            match attempt {
                Ok(n) => {
                    if now < size && n == 0 {
                        failures += 1; // the source ended early and gave nothing new
                    }
                }
                // A full disk does not get better by retrying: free what this wrote.
                Err(e @ ImageError::NoSpace { .. }) => {
                    let _ = fs::remove_file(&partial);
                    return Err(e);
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(blob = %expected, error = %e, failures, "download interrupted; resuming");
                    if failures >= 6 {
                        return Err(e);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200 * u64::from(1u32 << failures.min(5))));
                }
            }
            if failures >= 6 {
                return Err(ImageError::Invalid(format!("{expected}: the source keeps ending before {size} bytes")));
            }
        }
        // Verify the whole file (earlier attempts' bytes included), then keep it
        // by renaming: a layer is written to flash once.
        let mut f = fs::File::open(&partial).map_err(ImageError::io(format!("open {}", partial.display())))?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut f, &mut hasher).map_err(ImageError::io(format!("hash {}", partial.display())))?;
        let actual = Digest::from_sha256(&hasher.finalize());
        if &actual != expected {
            let _ = fs::remove_file(&partial);
            return Err(ImageError::DigestMismatch { expected: expected.clone(), actual });
        }
        f.sync_all().map_err(ImageError::io(format!("sync {}", partial.display())))?;
        fs::rename(&partial, &dest).map_err(ImageError::io(format!("store {}", dest.display())))?;
        Ok(downloaded)
    }

    /// A small blob (manifest, index, config), refused unread past 4 MiB.
    pub fn read_document(&self, d: &Digest) -> Result<Vec<u8>, ImageError> {
        let path = self.blob_path(d);
        let f = fs::File::open(&path).map_err(ImageError::io(format!("open {}", path.display())))?;
        let mut bytes = Vec::new();
        f.take(MAX_DOCUMENT + 1).read_to_end(&mut bytes).map_err(ImageError::io(format!("read {}", path.display())))?;
        if bytes.len() as u64 > MAX_DOCUMENT {
            return Err(ImageError::Invalid(format!("{d} is larger than {MAX_DOCUMENT} bytes: not a manifest")));
        }
        Ok(bytes)
    }

    fn catalog(&self) -> Catalog {
        fs::read(self.root.join("images.json")).ok().and_then(|b| Catalog::parse(&b)).unwrap_or_default()
    }

    fn write_catalog(&self, catalog: &Catalog) -> Result<(), ImageError> {
        let bytes = serde_json::to_vec_pretty(catalog).map_err(|e| ImageError::Invalid(e.to_string()))?;
        write_atomic(&self.root.join("images.json"), &bytes).map_err(ImageError::io("write images.json"))
    }

    /// Every name with the image it points at (`baton-agent image list`).
    pub fn images(&self) -> Vec<ImageRecord> {
        let catalog = self.catalog();
        catalog
            .tags
            .iter()
            .filter_map(|(name, hex)| Some(ImageRecord { reference: name.clone(), ..catalog.images.get(hex)?.clone() }))
            .collect()
    }

    /// Records an image whose blobs are all in the store, under its
    /// reference. Other names pointing at the same image keep it; the name
    /// stops pointing at whatever image it named before.
    pub fn record_image(&self, record: &ImageRecord) -> Result<(), ImageError> {
        let mut catalog = self.catalog();
        let hex = record.manifest.hex().to_string();
        let mut kept = record.clone();
        if let Some(old) = catalog.images.get(&hex) {
            // The same bytes pulled through an index and then by manifest keep both handles.
            kept.index = kept.index.or_else(|| old.index.clone());
        }
        // One name, one image, however it is spelled.
        let key = tag_key(&record.reference);
        catalog.tags.retain(|name, _| tag_key(name) != key);
        catalog.tags.insert(record.reference.clone(), hex.clone());
        catalog.images.insert(hex, kept);
        self.write_catalog(&catalog)
    }

    /// Finds a stored image by digest (its manifest's, or the multi-platform
    /// index's it was chosen from) when one is given, else by name.
    pub fn resolve(&self, reference: &str, digest: Option<&str>) -> Result<ImageRecord, ImageError> {
        let catalog = self.catalog();
        if let Some(d) = digest.filter(|d| !d.is_empty()) {
            let d = Digest::parse(d)?;
            return catalog.by_digest(&d).cloned().ok_or_else(|| ImageError::NotFound(format!("{reference}@{d}")));
        }
        catalog.by_name(reference).cloned().ok_or_else(|| ImageError::NotFound(reference.into()))
    }

    /// Imports an OCI image layout: a directory, or a tarball of one
    /// (`baton-agent image load`). `name` overrides the layout's ref name.
    pub fn import_layout(&self, path: &Path, name: Option<&str>) -> Result<ImageRecord, ImageError> {
        if path.is_file() {
            let tmp = self.temp_path("layout");
            fs::create_dir_all(&tmp).map_err(ImageError::io(format!("create {}", tmp.display())))?;
            let result = fs::File::open(path)
                .map_err(ImageError::io(format!("open {}", path.display())))
                .and_then(|f| apply_layer(f, &tmp).map(|_| ()))
                .and_then(|()| {
                    if super::archive::is_docker_archive(&tmp) {
                        super::archive::to_oci_layout(&tmp)?;
                    }
                    self.import_layout(&tmp, name)
                });
            let _ = fs::remove_dir_all(&tmp);
            return result;
        }
        if super::archive::is_docker_archive(path) {
            return Err(ImageError::Invalid(format!(
                "{} is an unpacked docker archive: load the .tar that `docker save` wrote",
                path.display()
            )));
        }
        let index_bytes = fs::read(path.join("index.json")).map_err(ImageError::io(format!(
            "{} is neither an OCI image layout (index.json) nor a docker archive (manifest.json)",
            path.display()
        )))?;
        let index: manifest::Index = serde_json::from_slice(&index_bytes)
            .map_err(|e| ImageError::Invalid(format!("{}/index.json: {e}", path.display())))?;
        let top = if index.manifests.len() > 1 && index.manifests.iter().all(|d| d.platform.is_none()) {
            // A layout of several tags (umoci, skopeo), not a multi-platform index.
            by_ref_name(&index, name, &path.display().to_string())?
        } else {
            manifest::select_platform(&index, &self.platform, &format!("{}/index.json", path.display()))?
        };
        // `docker save` (25+) writes an OCI layout whose ref.name is the bare
        // tag and whose containerd annotation has the whole name.
        let reference = name
            .map(str::to_string)
            .or_else(|| top.annotations.get(ANNOTATION_CONTAINERD_NAME).cloned())
            .or_else(|| top.annotations.get(ANNOTATION_REF_NAME).cloned())
            .ok_or_else(|| {
                ImageError::Invalid("the layout names no image (ref.name annotation): pass a name".into())
            })?;

        let from_layout = |d: &Descriptor| -> Result<(), ImageError> {
            let src = path.join("blobs/sha256").join(d.digest.hex());
            let f = fs::File::open(&src).map_err(ImageError::io(format!("layout blob {}", d.digest)))?;
            self.put_blob(f, &d.digest, Some(d.size)).map(|_| ())
        };
        // Follow nested indexes down to this platform's manifest.
        let mut desc = top.clone();
        let manifest = loop {
            if desc.size > MAX_DOCUMENT {
                return Err(ImageError::Invalid(format!("{} is {} bytes: not a manifest", desc.digest, desc.size)));
            }
            from_layout(&desc)?;
            match manifest::parse_document(&desc.media_type, &self.read_document(&desc.digest)?)? {
                Document::Manifest(m) => break m,
                Document::Index(i) => {
                    desc = manifest::select_platform(&i, &self.platform, desc.digest.as_str())?.clone()
                }
            }
        };
        from_layout(&manifest.config)?;
        let config: ImageConfig = serde_json::from_slice(&self.read_document(&manifest.config.digest)?)
            .map_err(|e| ImageError::Invalid(format!("image config {}: {e}", manifest.config.digest)))?;
        // An index already chose by platform; a lone manifest is checked by its config.
        if !config.architecture.is_empty() && config.architecture != self.platform.architecture {
            return Err(ImageError::NoPlatform {
                platform: self.platform.to_string(),
                what: reference,
                available: format!("{}/{}", config.os, config.architecture),
            });
        }
        // A layer already unpacked (from any image, compressed any way) is not copied again.
        let ids = diff_ids(&config, manifest.layers.len());
        for (i, layer) in manifest.layers.iter().enumerate() {
            if !ids.get(i).is_some_and(|d| self.layer_path(d).is_dir()) {
                from_layout(layer)?;
            }
        }
        let record = ImageRecord {
            reference,
            index: (desc.digest != top.digest).then(|| top.digest.clone()),
            manifest: desc.digest,
            config,
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            config_digest: Some(manifest.config.digest.clone()),
            imported_at: crate::runtime::now_ms(),
        };
        self.record_image(&record)?;
        Ok(record)
    }

    /// Where an image was unpacked whole by an agent from before shared layers.
    fn legacy_rootfs_path(&self, image: &ImageRecord) -> PathBuf {
        self.root.join("rootfs").join(image.manifest.hex())
    }

    pub fn layer_path(&self, layer: &Digest) -> PathBuf {
        self.root.join("layers").join(layer.hex())
    }

    /// Where each layer of `image` is unpacked, bottom first: by its
    /// uncompressed digest (the config's diff_ids), so the same content
    /// compressed two ways is stored once — or where an agent from before
    /// that unpacked it (by its blob digest), when that is what is there.
    pub fn layer_dirs(&self, image: &ImageRecord) -> Vec<PathBuf> {
        let diff_ids = diff_ids(&image.config, image.layers.len());
        image
            .layers
            .iter()
            .enumerate()
            .map(|(i, blob)| match diff_ids.get(i) {
                Some(d) if !self.layer_path(blob).is_dir() || self.layer_path(d).is_dir() => self.layer_path(d),
                _ => self.layer_path(blob),
            })
            .collect()
    }

    /// Bytes the store holds (blobs, unpacked layers and legacy rootfs trees).
    pub fn size(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        ["blobs", "layers", "rootfs"].iter().map(|d| walk(&self.root.join(d))).sum()
    }

    /// Frees space while the store is over `budget` bytes: removes the oldest
    /// images that are neither `keep` (named by the desired document) nor
    /// `in_use` (one of their layers is under a container: running, or the
    /// previous revision kept for rollback), then every blob and unpacked
    /// layer no remaining image references and no container uses.
    pub fn gc(&self, keep: &BTreeSet<String>, in_use: &BTreeSet<PathBuf>, budget: u64) -> Result<GcStats, ImageError> {
        let mut stats = GcStats::default();
        // Downloads abandoned for a day (a workload changed its mind) go whatever the budget.
        for partial in fs::read_dir(self.root.join("tmp")).into_iter().flatten().flatten() {
            let old = partial.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if partial.file_name().to_string_lossy().ends_with(".partial")
                && old.is_some_and(|age| age > ABANDONED_PARTIAL)
            {
                let _ = fs::remove_file(partial.path());
            }
        }
        let mut size = self.size();
        if size <= budget {
            return Ok(stats);
        }
        let mut catalog = self.catalog();
        let keep_names: BTreeSet<String> =
            keep.iter().filter(|k| !k.starts_with("sha256:")).map(|k| tag_key(k)).collect();
        // Each image's layer directories, looked up once for the whole collection.
        let mut dirs: BTreeMap<String, Vec<PathBuf>> =
            catalog.images.values().map(|r| (r.manifest.hex().to_string(), self.layer_dirs(r))).collect();
        let mut candidates: Vec<ImageRecord> = catalog
            .images
            .values()
            .filter(|r| {
                // A container runs on exactly its image's layers (other images may share some).
                let running = !r.layers.is_empty()
                    && dirs.get(r.manifest.hex()).is_some_and(|d| d.iter().all(|l| in_use.contains(l)));
                !catalog.names_of(r.manifest.hex()).any(|n| keep.contains(n) || keep_names.contains(&tag_key(n)))
                    && !keep.contains(r.manifest.as_str())
                    && !r.index.as_ref().is_some_and(|i| keep.contains(i.as_str()))
                    && !in_use.contains(&self.legacy_rootfs_path(r))
                    && !running
            })
            .cloned()
            .collect();
        candidates.sort_by_key(|r| r.imported_at);
        for victim in candidates {
            if size <= budget {
                break;
            }
            catalog.images.remove(victim.manifest.hex());
            catalog.tags.retain(|_, hex| hex != victim.manifest.hex());
            let _ = fs::remove_dir_all(self.legacy_rootfs_path(&victim));
            // Its layers that no remaining image shares and no container uses.
            let victim_dirs = dirs.remove(victim.manifest.hex()).unwrap_or_default();
            for path in victim_dirs {
                let shared = dirs.values().any(|d| d.contains(&path));
                if !shared && !in_use.contains(&path) {
                    let _ = fs::remove_dir_all(&path);
                }
            }
            stats.images_removed.push(victim.reference.clone());
            size = self.size();
        }
        if stats.images_removed.is_empty() {
            return Ok(stats);
        }
        self.write_catalog(&catalog)?;
        let referenced: BTreeSet<String> = catalog
            .images
            .values()
            .flat_map(|r| std::iter::once(&r.manifest).chain(&r.config_digest).chain(&r.layers))
            .map(|d| d.hex().to_string())
            .collect();
        for blob in fs::read_dir(self.root.join("blobs/sha256")).into_iter().flatten().flatten() {
            let name = blob.file_name().to_string_lossy().into_owned();
            if !referenced.contains(&name) {
                let len = blob.metadata().map_or(0, |m| m.len());
                if fs::remove_file(blob.path()).is_ok() {
                    stats.blobs_removed += 1;
                    stats.bytes_freed += len;
                }
            }
        }
        tracing::info!(images = ?stats.images_removed, blobs = stats.blobs_removed, freed = stats.bytes_freed, "image GC");
        Ok(stats)
    }

    /// The filesystem of `image`: its layers, each unpacked on first use
    /// (once for every image that shares it).
    pub fn rootfs(&self, image: &ImageRecord) -> Result<Rootfs, ImageError> {
        let mut layers: Vec<PathBuf> = Vec::with_capacity(image.layers.len());
        let diff_ids = diff_ids(&image.config, image.layers.len());
        for ((i, layer), dest) in image.layers.iter().enumerate().zip(self.layer_dirs(image)) {
            if !dest.is_dir() {
                if !self.has_blob(layer) {
                    // Unpacked once, its blob dropped, its directory since lost: pull it again.
                    return Err(ImageError::NotFound(format!("layer {layer} of {}", image.reference)));
                }
                // The layers below, top first: a hard link to one of their files becomes a copy.
                let lowers: Vec<PathBuf> = layers.iter().rev().cloned().collect();
                self.unpack_layer(layer, diff_ids.get(i), &dest, &lowers)?;
            }
            layers.push(dest);
        }
        Ok(Rootfs { layers })
    }

    /// Unpacks one layer blob (gzip, zstd or plain tar) into `dest`, through
    /// a temp dir: a failed unpack leaves nothing that looks complete.
    /// With the layer's `diff_id`, the uncompressed stream is checked against
    /// it, and once the layer is in place its blob is deleted: the device
    /// keeps each layer once, unpacked.
    fn unpack_layer(
        &self,
        layer: &Digest,
        diff_id: Option<&Digest>,
        dest: &Path,
        lowers: &[PathBuf],
    ) -> Result<(), ImageError> {
        let path = self.blob_path(layer);
        let mut magic = [0u8; 4];
        let n = fs::File::open(&path)
            .and_then(|mut f| f.read(&mut magic))
            .map_err(ImageError::io(format!("read layer {layer}")))?;
        let compression = match &magic[..n] {
            [0x1f, 0x8b, ..] => super::space::Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd] => super::space::Compression::Zstd,
            _ => super::space::Compression::None,
        };
        let what = format!("unpacking layer {layer}");
        let estimate = super::space::unpacked_estimate(&path, compression);
        self.room(estimate, &what)?;
        let tmp = self.temp_path("layer");
        fs::create_dir_all(&tmp).map_err(ImageError::io(format!("create {}", tmp.display())))?;
        let result = (|| {
            let f = fs::File::open(&path).map_err(ImageError::io(format!("open layer {layer}")))?;
            // Say which layer broke, whatever broke in it; a full disk says so.
            let named = |e: ImageError| match e {
                ImageError::Io { source, .. } if super::space::is_full(&source) => {
                    super::space::full(&self.root, estimate, self.reserve, &what)
                }
                ImageError::Io { context, source } => {
                    ImageError::Io { context: format!("layer {layer}: {context}"), source }
                }
                other => other,
            };
            let target = Target::Layer { lowers };
            // An estimate can be wrong (a zstd stream does not say its size):
            // the unpack stops where the reserve begins, not at a full disk.
            let guard = |written: u64| {
                self.room(0, &what)
                    .map_err(|_| super::space::full(&self.root, written.max(estimate), self.reserve, &what))
            };
            let stream: Box<dyn Read> = match compression {
                super::space::Compression::Gzip => Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f))),
                super::space::Compression::Zstd => Box::new(
                    ruzstd::decoding::StreamingDecoder::new(std::io::BufReader::new(f))
                        .map_err(|e| ImageError::Invalid(format!("layer {layer}: zstd: {e}")))?,
                ),
                super::space::Compression::None => Box::new(std::io::BufReader::new(f)),
            };
            let mut hashed = Hashing { inner: stream, hasher: Sha256::new() };
            unpack(&mut hashed, &tmp, target, &guard).map_err(named)?;
            // What follows the archive's end (zero blocks) is part of the digest.
            std::io::copy(&mut hashed, &mut std::io::sink()).map_err(ImageError::io(format!("read layer {layer}")))?;
            let actual = Digest::from_sha256(&hashed.hasher.finalize());
            if let Some(expected) = diff_id.filter(|d| **d != actual) {
                return Err(ImageError::Invalid(format!(
                    "layer {layer} unpacks to {actual}, but the image config says {expected}"
                )));
            }
            match fs::rename(&tmp, dest) {
                // Another thread unpacked the same layer meanwhile: theirs is as good.
                Err(_) if dest.is_dir() => {
                    let _ = fs::remove_dir_all(&tmp);
                }
                r => r.map_err(ImageError::io(format!("store layer {}", dest.display())))?,
            }
            // Verified and in place: the compressed copy is not needed any more.
            if diff_id.is_some() {
                let _ = fs::File::open(dest.parent().unwrap_or(dest)).and_then(|d| d.sync_all());
                let _ = fs::remove_file(&path);
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, char)]) -> manifest::Index {
        let manifests = entries
            .iter()
            .map(|(tag, d)| {
                let digest = Digest::parse(&format!("sha256:{}", d.to_string().repeat(64))).expect("digest");
                Descriptor {
                    media_type: manifest::MEDIA_OCI_MANIFEST.into(),
                    digest,
                    size: 1,
                    platform: None,
                    annotations: BTreeMap::from([(ANNOTATION_REF_NAME.to_string(), tag.to_string())]),
                }
            })
            .collect();
        manifest::Index { media_type: None, manifests }
    }

    #[test]
    fn a_layout_of_several_tags_is_read_by_the_tag_named() {
        // umoci: two tags of one image.
        let same = index(&[("v1", 'a'), ("v2", 'a')]);
        assert_eq!(by_ref_name(&same, Some("x:y"), "l").expect("one image").annotations[ANNOTATION_REF_NAME], "v1");
        let two = index(&[("v1", 'a'), ("v2", 'b')]);
        let pick = |n| by_ref_name(&two, n, "l").map(|d| d.annotations[ANNOTATION_REF_NAME].clone());
        assert_eq!(pick(Some("registry.local:5000/app:v2")).expect("by tag"), "v2");
        assert_eq!(pick(Some("v1")).expect("by ref name"), "v1");
        let e = pick(Some("registry.local:5000/app")).expect_err("no tag matches").to_string();
        assert!(e.contains("holds 2 different images (tags v1, v2)"), "{e}");
        assert!(pick(None).is_err());
    }
}
