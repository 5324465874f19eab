//! Any bytes as an OCI / Docker manifest or index, and a platform chosen
//! from whatever index parses: never a panic.
#![no_main]
use baton_agent::image::manifest::{parse_document, select_platform, Document, Platform};
use libfuzzer_sys::fuzz_target;

const MEDIA_TYPES: [&str; 5] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "",
];

fuzz_target!(|data: &[u8]| {
    for media_type in MEDIA_TYPES {
        if let Ok(Document::Index(index)) = parse_document(media_type, data) {
            for arch in ["amd64", "arm64", "arm"] {
                let platform = Platform { os: "linux".into(), architecture: arch.into(), variant: None };
                let _ = select_platform(&index, &platform, "fuzz");
            }
        }
    }
});
