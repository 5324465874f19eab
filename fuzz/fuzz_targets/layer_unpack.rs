//! Any bytes as an image layer (plain tar, or gzip / zstd by their magic),
//! unpacked both ways the agent does: never a panic, and nothing written
//! outside the directory it unpacks into.
#![no_main]
use std::io::Read;
use std::path::Path;

use baton_agent::image::unpack::{apply_layer, unpack, Target};
use libfuzzer_sys::fuzz_target;

fn layer(data: &[u8]) -> Box<dyn Read + '_> {
    match data {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(data)),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => match ruzstd::decoding::StreamingDecoder::new(data) {
            Ok(z) => Box::new(z),
            Err(_) => Box::new(data),
        },
        _ => Box::new(data),
    }
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

fuzz_target!(|data: &[u8]| {
    let Ok(sandbox) = tempfile::tempdir() else { return };
    let (merged, own) = (sandbox.path().join("merged"), sandbox.path().join("layer"));
    let _ = std::fs::create_dir(&merged);
    let _ = std::fs::create_dir(&own);
    let _ = apply_layer(layer(data), &merged);
    let lowers = [merged.clone()];
    let _ = unpack(layer(data), &own, Target::Layer { lowers: &lowers }, &|_| Ok(()));
    assert_eq!(entries(sandbox.path()), 2, "a layer wrote beside the directory it was unpacked into");
});
