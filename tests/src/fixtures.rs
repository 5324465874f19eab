//! Container fixtures built from Debian's busybox-static.

use std::path::{Path, PathBuf};

pub const BUSYBOX: &str = "/bin/busybox";

/// A minimal rootfs: busybox and the applets the tests use.
pub fn busybox_rootfs(dir: &Path) -> std::io::Result<PathBuf> {
    let root = dir.join("rootfs");
    for d in ["bin", "dev", "proc", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox"))?;
    for applet in ["sh", "sleep", "echo", "cat", "true", "false"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    Ok(root)
}

/// One layer of a fixture image: a directory tree, or loose files (both
/// tarred and gzipped), or a blob made elsewhere with its media type.
pub enum Layer<'a> {
    Dir(&'a Path),
    Files(Vec<(&'a str, Vec<u8>)>),
    Raw(&'a str, Vec<u8>),
}

/// An OCI image layout holding one image: one gzipped layer with `rootfs`,
/// named `name`, for this machine's architecture. Returns the layout dir.
pub fn oci_layout(dir: &Path, rootfs: &Path, name: &str) -> std::io::Result<PathBuf> {
    oci_layout_layers(dir, &[Layer::Dir(rootfs)], name)
}

/// An OCI image layout holding one image made of `layers` (gzipped, in order).
pub fn oci_layout_layers(dir: &Path, layers: &[Layer<'_>], name: &str) -> std::io::Result<PathBuf> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let (digest, size) = write_image(dir, layers, arch, None)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size,
        "annotations": {"org.opencontainers.image.ref.name": name},
    }]});
    std::fs::write(dir.join("index.json"), index.to_string())?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(dir.to_path_buf())
}

/// An OCI image layout whose `name` is a multi-platform index: one image per
/// `(architecture, variant, layers)`. `skopeo copy --all` pushes all of it.
pub fn oci_multiarch_layout(
    dir: &Path,
    images: &[(&str, Option<&str>, Vec<Layer<'_>>)],
    name: &str,
) -> std::io::Result<PathBuf> {
    let mut manifests = Vec::new();
    for (arch, variant, layers) in images {
        let (digest, size) = write_image(dir, layers, arch, *variant)?;
        let mut platform = serde_json::json!({"architecture": arch, "os": "linux"});
        if let Some(v) = variant {
            platform["variant"] = serde_json::json!(v);
        }
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size, "platform": platform,
        }));
    }
    let (digest, size) = put_blob(
        dir,
        serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests,
        })
        .to_string()
        .as_bytes(),
    )?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": size,
        "annotations": {"org.opencontainers.image.ref.name": name},
    }]});
    std::fs::write(dir.join("index.json"), index.to_string())?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(dir.to_path_buf())
}

fn put_blob(dir: &Path, bytes: &[u8]) -> std::io::Result<(String, usize)> {
    use sha2::Digest as _;
    let hex: String = sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    std::fs::write(dir.join("blobs/sha256").join(&hex), bytes)?;
    Ok((format!("sha256:{hex}"), bytes.len()))
}

/// Writes the layers, config and manifest of one image; returns the manifest's (digest, size).
fn write_image(
    dir: &Path,
    layers: &[Layer<'_>],
    arch: &str,
    variant: Option<&str>,
) -> std::io::Result<(String, usize)> {
    use std::io::Write;
    let mut descriptors = Vec::new();
    // Each layer's uncompressed digest, as every image builder writes them
    // (none when a raw layer's content is not known to be a plain tar stream).
    let mut diff_ids: Option<Vec<String>> = Some(Vec::new());
    for layer in layers {
        if let Layer::Raw(media_type, bytes) = layer {
            let (digest, size) = put_blob(dir, bytes)?;
            descriptors.push(serde_json::json!({"mediaType": media_type, "digest": digest, "size": size}));
            diff_ids = None;
            continue;
        }
        let mut tar = tar::Builder::new(Vec::new());
        tar.follow_symlinks(false);
        match layer {
            Layer::Dir(d) => tar.append_dir_all(".", d)?,
            Layer::Files(files) => {
                for (path, data) in files {
                    let mut h = tar::Header::new_gnu();
                    h.set_path(path)?;
                    h.set_size(data.len() as u64);
                    h.set_mode(0o644);
                    h.set_cksum();
                    tar.append(&h, &data[..])?;
                }
            }
            Layer::Raw(..) => unreachable!("raw layers are stored as they are"),
        }
        let plain = tar.into_inner()?;
        if let Some(ids) = diff_ids.as_mut() {
            use sha2::Digest as _;
            ids.push(format!(
                "sha256:{}",
                sha2::Sha256::digest(&plain).iter().map(|b| format!("{b:02x}")).collect::<String>()
            ));
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain)?;
        let (digest, size) = put_blob(dir, &gz.finish()?)?;
        descriptors.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}));
    }
    let mut config = serde_json::json!({"architecture": arch, "os": "linux", "config": {"Env": ["PATH=/bin"]}});
    if let Some(ids) = diff_ids {
        config["rootfs"] = serde_json::json!({"type": "layers", "diff_ids": ids});
    }
    if let Some(v) = variant {
        config["variant"] = serde_json::json!(v);
    }
    let config = put_blob(dir, config.to_string().as_bytes())?;
    put_blob(
        dir,
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
            "layers": descriptors,
        })
        .to_string()
        .as_bytes(),
    )
}
