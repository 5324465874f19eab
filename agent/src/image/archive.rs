//! `docker save` archives (also written by `podman save --format
//! docker-archive` and `skopeo copy … docker-archive:`): a `manifest.json`
//! naming a config file and layer files per image, instead of an OCI
//! layout's `index.json`. An unpacked archive is turned, in place, into the
//! OCI layout the store imports: each file becomes a blob named by its
//! digest, and a manifest and an index are written for the image.
//!
//! The paths in `manifest.json` come from the archive: each is taken inside
//! the archive's directory only, and only as a regular file reached without
//! a symlink (an archive must not make the agent read a host file into an
//! image).

use std::fs;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::ImageError;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Whether `dir` holds an unpacked `docker save` archive and no OCI index.
pub fn is_docker_archive(dir: &Path) -> bool {
    dir.join("manifest.json").is_file() && !dir.join("index.json").exists()
}

/// `rel` inside `dir`, as a regular file reached through real directories only.
fn inside(dir: &Path, rel: &str) -> Result<PathBuf, ImageError> {
    let mut cur = dir.to_path_buf();
    let parts: Vec<Component> = Path::new(rel).components().collect();
    if parts.is_empty() || parts.iter().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(ImageError::UnsafeLayer(format!("docker archive names {rel:?}: not a path inside the archive")));
    }
    for (i, part) in parts.iter().enumerate() {
        cur.push(part);
        let m = fs::symlink_metadata(&cur)
            .map_err(|e| ImageError::Invalid(format!("docker archive: {rel} is missing ({e})")))?;
        let last = i + 1 == parts.len();
        if m.file_type().is_symlink() || (last && !m.is_file()) || (!last && !m.is_dir()) {
            return Err(ImageError::UnsafeLayer(format!("docker archive: {rel} is not a regular file inside it")));
        }
    }
    Ok(cur)
}

/// Moves `file` to `blobs/sha256/<digest>`; returns (digest, size).
fn to_blob(dir: &Path, file: &Path) -> Result<(String, u64), ImageError> {
    let mut f = fs::File::open(file).map_err(ImageError::io(format!("open {}", file.display())))?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut f, &mut hasher).map_err(ImageError::io(format!("read {}", file.display())))?;
    let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(ImageError::io(format!("create {}", blobs.display())))?;
    let dest = blobs.join(&hex);
    if dest != file {
        // The same file may be named twice (a layer repeated): copy, do not move.
        fs::copy(file, &dest).map_err(ImageError::io(format!("store {}", dest.display())))?;
    }
    Ok((format!("sha256:{hex}"), size))
}

/// The layer media type its first bytes say (docker archives hold plain
/// tars; skopeo may keep a registry's compressed blobs).
fn layer_media_type(file: &Path) -> &'static str {
    let mut magic = [0u8; 4];
    let n = fs::File::open(file).and_then(|mut f| f.read(&mut magic)).unwrap_or(0);
    match &magic[..n] {
        [0x1f, 0x8b, ..] => "application/vnd.oci.image.layer.v1.tar+gzip",
        [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.oci.image.layer.v1.tar+zstd",
        _ => "application/vnd.oci.image.layer.v1.tar",
    }
}

/// Writes an OCI `index.json` (and the manifests it names) for the images of
/// the docker archive unpacked in `dir`, each named by its first RepoTag.
pub fn to_oci_layout(dir: &Path) -> Result<(), ImageError> {
    let bytes = fs::read(inside(dir, "manifest.json")?).map_err(ImageError::io("read manifest.json"))?;
    let entries: Vec<Entry> = serde_json::from_slice(&bytes)
        .map_err(|e| ImageError::Invalid(format!("docker archive manifest.json: {e}")))?;
    if entries.is_empty() {
        return Err(ImageError::Invalid("docker archive manifest.json names no image".into()));
    }
    let mut index_entries = Vec::new();
    for entry in &entries {
        let (config_digest, config_size) = to_blob(dir, &inside(dir, &entry.config)?)?;
        let mut layers = Vec::new();
        for layer in &entry.layers {
            let file = inside(dir, layer)?;
            let media_type = layer_media_type(&file);
            let (digest, size) = to_blob(dir, &file)?;
            layers.push(serde_json::json!({"mediaType": media_type, "digest": digest, "size": size}));
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
            "layers": layers,
        })
        .to_string();
        let hex: String = Sha256::digest(manifest.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        fs::write(dir.join("blobs/sha256").join(&hex), &manifest).map_err(ImageError::io("write a manifest"))?;
        let mut desc = serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{hex}"),
            "size": manifest.len(),
        });
        if let Some(tag) = entry.repo_tags.as_ref().and_then(|t| t.first()) {
            desc["annotations"] = serde_json::json!({ super::manifest::ANNOTATION_REF_NAME: tag });
        }
        index_entries.push(desc);
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": index_entries});
    fs::write(dir.join("index.json"), index.to_string()).map_err(ImageError::io("write index.json"))?;
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).map_err(ImageError::io("write oci-layout"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_from_the_archive_stay_inside_it_and_are_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.tar"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("host.tar")).unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        assert!(inside(dir.path(), "a.tar").is_ok());
        for bad in ["../a.tar", "/etc/passwd", "host.tar", "d", ""] {
            assert!(inside(dir.path(), bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_manifest_without_images_or_with_a_missing_layer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("manifest.json"), "[]").unwrap();
        assert!(to_oci_layout(dir.path()).unwrap_err().to_string().contains("names no image"));
        fs::write(dir.path().join("c.json"), "{}").unwrap();
        fs::write(
            dir.path().join("manifest.json"),
            r#"[{"Config":"c.json","RepoTags":["a:1"],"Layers":["gone.tar"]}]"#,
        )
        .unwrap();
        assert!(to_oci_layout(dir.path()).unwrap_err().to_string().contains("gone.tar is missing"));
    }
}
