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

/// An OCI image layout holding one image: one gzipped layer with `rootfs`,
/// named `name`, for this machine's architecture. Returns the layout dir.
pub fn oci_layout(dir: &Path, rootfs: &Path, name: &str) -> std::io::Result<PathBuf> {
    use sha2::Digest as _;
    use std::io::Write;
    let put = |bytes: &[u8]| -> std::io::Result<(String, usize)> {
        let hex: String = sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        std::fs::create_dir_all(dir.join("blobs/sha256"))?;
        std::fs::write(dir.join("blobs/sha256").join(&hex), bytes)?;
        Ok((format!("sha256:{hex}"), bytes.len()))
    };
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    tar.follow_symlinks(false);
    tar.append_dir_all(".", rootfs)?;
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    let layer = put(&gz.finish()?)?;
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = put(serde_json::json!({"architecture": arch, "os": "linux", "config": {"Env": ["PATH=/bin"]}})
        .to_string()
        .as_bytes())?;
    let manifest = put(serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.0, "size": layer.1}],
    })
    .to_string()
    .as_bytes())?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest.0, "size": manifest.1,
        "annotations": {"org.opencontainers.image.ref.name": name},
    }]});
    std::fs::write(dir.join("index.json"), index.to_string())?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(dir.to_path_buf())
}
