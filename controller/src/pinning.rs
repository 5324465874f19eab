//! An edge: image tags pinned to digests at apply, by asking the registry
//! (blocking HTTP; call off the async workers). A registry that cannot
//! answer does not fail the apply: the digest already pinned for the same
//! image is kept, else devices pull the tag; each note says which.

use crate::controller::Controller;
use crate::workload::Validated;

/// What pinning an image's tag found: a note for the apply's output, and the
/// platforms its index offers (None: a single-platform manifest, or unknown).
#[derive(Debug, Default)]
pub struct Pinned {
    pub note: Option<String>,
    pub platforms: Option<Vec<String>>,
}

/// Pins each workload's image to the digest its tag names now (an image
/// given by digest is pinned as given), so every device of a revision runs
/// the same bytes.
pub fn pin_digests(c: &Controller, validated: &mut [Validated]) -> Vec<Pinned> {
    let mut notes = Vec::with_capacity(validated.len());
    for v in validated.iter_mut() {
        let spec = &mut v.spec;
        if let Some((_, digest)) = spec.image.split_once('@') {
            spec.image_digest = digest.to_string();
            notes.push(Pinned::default());
            continue;
        }
        let Some(client) = &c.registry else {
            notes.push(Pinned::default());
            continue;
        };
        let mut platforms = None;
        let note = match client.resolve_platforms(&spec.image) {
            Ok((digest, offered)) => {
                let note = format!("{} → {digest}", spec.image);
                spec.image_digest = digest;
                platforms = offered;
                note
            }
            Err(e) => match c.pinned_digest(&spec.name, &spec.image) {
                Some(d) => {
                    let note = format!("cannot resolve {} ({e}); keeping {d}", spec.image);
                    spec.image_digest = d;
                    note
                }
                None => format!("cannot resolve {} ({e}); devices pull the tag", spec.image),
            },
        };
        notes.push(Pinned { note: Some(note), platforms });
    }
    notes
}

/// The platform (`linux/arm64/v8`) a device of `arch` (as `uname -m`
/// says) and `variant` needs when `offered` (an index's platforms) lacks it.
pub fn missing_platform(arch: &str, variant: &str, offered: &[String]) -> Option<String> {
    let arch = match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let found = offered.iter().any(|p| {
        let mut parts = p.split('/');
        let (os, a, v) = (parts.next(), parts.next(), parts.next());
        os == Some("linux") && a == Some(arch) && (v.is_none() || variant.is_empty() || v == Some(variant))
    });
    (!found).then(|| if variant.is_empty() { format!("linux/{arch}") } else { format!("linux/{arch}/{variant}") })
}

#[cfg(test)]
mod tests {
    use super::missing_platform;

    #[test]
    fn platform_table() {
        let offered: Vec<String> = ["linux/amd64", "linux/arm/v7", "linux/arm64/v8"].map(String::from).into();
        for (arch, variant, want) in [
            ("x86_64", "", None),
            ("aarch64", "", None),
            ("aarch64", "v8", None),
            ("armv7l", "", Some("linux/armv7l")),
            ("arm", "v7", None),
            ("arm", "v6", Some("linux/arm/v6")),
            ("riscv64", "", Some("linux/riscv64")),
        ] {
            assert_eq!(missing_platform(arch, variant, &offered).as_deref(), want, "{arch} {variant}");
        }
        assert_eq!(missing_platform("aarch64", "", &["windows/arm64".into()]).as_deref(), Some("linux/arm64"));
    }
}
