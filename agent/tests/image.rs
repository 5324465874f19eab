//! Importing OCI image layouts into the store and running containers from them.

mod common;

use std::time::Duration;

use baton_agent::image::{ImageError, ImageStore};
use baton_agent::runtime::{ContainerRuntime, CreateRequest};
use common::layout::*;
use common::*;

fn blob_count(store_root: &std::path::Path) -> usize {
    std::fs::read_dir(store_root.join("blobs/sha256")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn load_a_layout_unpack_once_and_run_a_container_from_it() {
    let fx = Fixture::new();
    let layout_dir = fx.dir.path().join("layout");
    let base = put(&layout_dir, &layer_from(Some(&fx.rootfs), &[]));
    let extra = put(&layout_dir, &layer_from(None, &[("etc/motd", b"from the second layer\n")]));
    let manifest = image(&layout_dir, here(), &[&base, &extra]);
    index(&layout_dir, "registry.local/busybox:1", &[(&manifest, None)]);

    let store_root = fx.dir.path().join("images");
    let store = ImageStore::open(&store_root).unwrap();
    let record = store.import_layout(&layout_dir, None).unwrap();
    assert_eq!(record.reference, "registry.local/busybox:1");
    assert_eq!(record.layers.len(), 2);
    assert_eq!(record.config.config.cmd.as_deref(), Some(&["/bin/sh".to_string()][..]));
    let blobs = blob_count(&store_root);
    assert_eq!(blobs, 4, "2 layers + config + manifest");

    // Importing again stores nothing new and names the same image (only its
    // import time moves, which is what GC's "oldest unused first" wants).
    let same = |r: &baton_agent::image::ImageRecord| {
        (r.reference.clone(), r.manifest.clone(), r.layers.clone(), r.config_digest.clone())
    };
    let again = store.import_layout(&layout_dir, None).unwrap();
    assert_eq!(same(&again), same(&record));
    assert_eq!(blob_count(&store_root), blobs);
    assert_eq!(same(&store.resolve("registry.local/busybox:1", None).unwrap()), same(&record));
    assert_eq!(same(&store.resolve("anything", Some(record.manifest.as_str())).unwrap()), same(&record));

    let rootfs = store.rootfs(&record).unwrap();
    assert_eq!(store.rootfs(&record).unwrap(), rootfs, "unpacked twice");
    let rt = fx.runtime();
    let id = cid("fromimage");
    rt.create(&CreateRequest {
        id: &id,
        spec: &sh("cat /etc/motd; touch /written"),
        rootfs: rootfs.clone(),
        provenance: Default::default(),
    })
    .unwrap();
    assert_eq!(wait_exit(&rt, &id, Duration::from_secs(20)).code, 0);
    assert!(fx.log(&id).contains("stdout from the second layer"), "{}", fx.log(&id));
    assert!(rootfs.layers.iter().all(|l| !l.join("written").exists()), "a container wrote into a shared layer");
    rt.remove(&id).unwrap();
}

#[test]
fn multi_arch_index_picks_this_platform_and_names_what_it_has_when_not() {
    let fx = Fixture::new();
    let dir = fx.dir.path().join("layout");
    let mut manifests = Vec::new();
    for arch in ["amd64", "arm64", "arm"] {
        let l = put(&dir, &layer_from(None, &[("arch", arch.as_bytes())]));
        manifests.push((image(&dir, arch, &[&l]), arch));
    }
    let entries: Vec<_> = manifests.iter().map(|(m, a)| (m, Some(*a))).collect();
    index(&dir, "multi:1", &entries);
    let store = ImageStore::open(fx.dir.path().join("images")).unwrap();
    let record = store.import_layout(&dir, None).unwrap();
    let rootfs = store.rootfs(&record).unwrap();
    assert_eq!(std::fs::read_to_string(rootfs.lookup("arch").unwrap()).unwrap(), here());

    let only_other = fx.dir.path().join("other");
    let l = put(&only_other, &layer_from(None, &[("x", b"x")]));
    let m = image(&only_other, "riscv64", &[&l]);
    index(&only_other, "other:1", &[(&m, Some("riscv64"))]);
    let e = store.import_layout(&only_other, None).unwrap_err().to_string();
    assert!(e.contains("no image for platform linux/") && e.contains("linux/riscv64"), "{e}");
}

#[test]
fn one_image_under_two_names_keeps_both_and_its_index_digest_finds_it() {
    let fx = Fixture::new();
    let dir = fx.dir.path().join("layout");
    let mut manifests = Vec::new();
    for arch in ["amd64", "arm64", "riscv64"] {
        let l = put(&dir, &layer_from(None, &[("arch", arch.as_bytes())]));
        manifests.push((image(&dir, arch, &[&l]), arch));
    }
    // A multi-arch image as registries serve it: the layout names an index
    // blob (what a controller pins the tag to), which names each platform.
    let platforms: Vec<_> = manifests
        .iter()
        .map(|(m, a)| serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m.digest, "size": m.size, "platform": {"architecture": a, "os": "linux"}}))
        .collect();
    let idx = put(
        &dir,
        serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": platforms})
            .to_string()
            .as_bytes(),
    );
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": idx.digest, "size": idx.size}]}).to_string(),
    )
    .unwrap();
    let store = ImageStore::open(fx.dir.path().join("images")).unwrap();
    let first = store.import_layout(&dir, Some("app:1")).unwrap();
    assert_eq!(first.index.as_ref().map(|d| d.as_str()), Some(idx.digest.as_str()));
    assert_ne!(first.manifest.as_str(), idx.digest, "the platform's manifest is what is stored");
    // `docker tag`: the same image under a second name.
    let second = store.import_layout(&dir, Some("app:latest")).unwrap();
    assert_eq!(second.manifest, first.manifest);
    for name in ["app:1", "app:latest"] {
        assert_eq!(store.resolve(name, None).unwrap().manifest, first.manifest, "{name} lost");
    }
    // Pinned by the index digest (what the controller resolves a multi-arch tag to) or the manifest's.
    assert_eq!(store.resolve("app:1", Some(&idx.digest)).unwrap().manifest, first.manifest);
    assert_eq!(store.resolve("x", Some(first.manifest.as_str())).unwrap().manifest, first.manifest);
    let mut names: Vec<String> = store.images().into_iter().map(|r| r.reference).collect();
    names.sort();
    assert_eq!(names, ["app:1", "app:latest"]);
    // GC keeps an image pinned by its index digest.
    let keep = [idx.digest.clone()].into_iter().collect();
    store.gc(&keep, &Default::default(), 0).unwrap();
    assert!(store.resolve("app:1", None).is_ok(), "GC removed an image the desired state pins by index");
    store.gc(&Default::default(), &Default::default(), 0).unwrap();
    assert!(store.resolve("app:latest", None).is_err() && store.images().is_empty());
}

#[test]
fn corrupt_blobs_are_refused_and_nothing_of_them_is_kept() {
    let fx = Fixture::new();
    let dir = fx.dir.path().join("layout");
    let l = put(&dir, &layer_from(None, &[("f", b"good")]));
    let m = image(&dir, here(), &[&l]);
    index(&dir, "corrupt:1", &[(&m, None)]);
    let layer_file = dir.join("blobs/sha256").join(&l.digest[7..]);
    let mut bytes = std::fs::read(&layer_file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&layer_file, &bytes).unwrap();

    let root = fx.dir.path().join("images");
    let store = ImageStore::open(&root).unwrap();
    let e = store.import_layout(&dir, None).unwrap_err();
    assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
    assert!(!root.join("blobs/sha256").join(&l.digest[7..]).exists(), "corrupt layer kept");
    assert!(store.resolve("corrupt:1", None).is_err(), "image recorded despite a corrupt layer");
    assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0, "temp files left");
}

#[test]
fn a_layout_tarball_loads_and_a_shared_layer_is_stored_once() {
    let fx = Fixture::new();
    let dir = fx.dir.path().join("layout");
    let shared = put(&dir, &layer_from(Some(&fx.rootfs), &[]));
    let a = put(&dir, &layer_from(None, &[("app", b"a")]));
    let m = image(&dir, here(), &[&shared, &a]);
    index(&dir, "app-a:1", &[(&m, None)]);
    let tarball = fx.dir.path().join("app-a.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&tarball).unwrap());
        b.append_dir_all(".", &dir).unwrap();
        b.finish().unwrap();
    }
    let root = fx.dir.path().join("images");
    let store = ImageStore::open(&root).unwrap();
    store.import_layout(&tarball, None).unwrap();
    let before = blob_count(&root);

    let dir_b = fx.dir.path().join("layout-b");
    let shared_b = put(&dir_b, &layer_from(Some(&fx.rootfs), &[]));
    assert_eq!(shared_b.digest, shared.digest, "fixture layers must be reproducible");
    let b = put(&dir_b, &layer_from(None, &[("app", b"b")]));
    let m_b = image(&dir_b, here(), &[&shared_b, &b]);
    index(&dir_b, "app-b:1", &[(&m_b, None)]);
    store.import_layout(&dir_b, None).unwrap();
    // The configs are byte-identical, so only the new layer and the manifest are new.
    assert_eq!(blob_count(&root), before + 2);
}

#[test]
fn gc_over_budget_removes_only_unused_images_and_their_own_blobs() {
    let fx = Fixture::new();
    let root = fx.dir.path().join("images");
    let store = ImageStore::open(&root).unwrap();
    let dir = fx.dir.path().join("layouts");
    let shared = layer_from(Some(&fx.rootfs), &[]);
    let mut records = Vec::new();
    for name in ["wanted", "running", "old-unused", "new-unused"] {
        let d = dir.join(name);
        let base = put(&d, &shared);
        let own = put(&d, &layer_from(None, &[("name", name.as_bytes())]));
        let m = image(&d, here(), &[&base, &own]);
        index(&d, name, &[(&m, None)]);
        let r = store.import_layout(&d, None).unwrap();
        store.rootfs(&r).unwrap();
        records.push((r, own.digest));
        std::thread::sleep(Duration::from_millis(5)); // distinct import times: "oldest first" needs an order
    }
    let keep: std::collections::BTreeSet<String> = ["wanted".to_string()].into();
    let in_use: std::collections::BTreeSet<std::path::PathBuf> =
        store.rootfs(&records[1].0).unwrap().layers.into_iter().collect();

    // Under budget: nothing goes.
    assert!(store.gc(&keep, &in_use, u64::MAX).unwrap().images_removed.is_empty());
    // Over any budget: every unused image goes, oldest first; the others stay whole.
    let stats = store.gc(&keep, &in_use, 0).unwrap();
    assert_eq!(stats.images_removed, vec!["old-unused".to_string(), "new-unused".to_string()]);
    let names: Vec<String> = store.images().into_iter().map(|r| r.reference).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    for (r, own) in &records[..2] {
        // Checked before `rootfs`, which would unpack a missing layer again.
        assert!(r.layers.iter().all(|l| store.layer_path(l).is_dir()), "a kept image lost an unpacked layer");
        assert!(store.rootfs(r).unwrap().lookup("bin/busybox").is_some());
        assert!(store.has_blob(&baton_agent::image::Digest::parse(own).unwrap()));
        assert!(r.layers.iter().all(|l| store.has_blob(l)), "a kept image lost a layer");
    }
    for (_, own) in &records[2..] {
        let own = baton_agent::image::Digest::parse(own).unwrap();
        assert!(!store.has_blob(&own), "an unused layer survived");
        assert!(!store.layer_path(&own).exists(), "an unused unpacked layer survived");
    }
    // Each removed image had its own layer and manifest; configs are identical here, so shared and kept.
    assert_eq!(stats.blobs_removed, 2 * 2);
}

#[test]
fn zstd_layers_unpack_and_a_corrupt_one_is_refused_cleanly() {
    let fx = Fixture::new();
    let dir = fx.dir.path().join("layout");
    let base = put(&dir, &layer_from(Some(&fx.rootfs), &[]));
    let app = put(&dir, &zstd_layer(&[("etc/app.conf", b"compressed with zstd\n")]));
    let m = image(&dir, here(), &[&base, &app]);
    index(&dir, "zstd-app:1", &[(&m, None)]);
    let store = ImageStore::open(fx.dir.path().join("images")).unwrap();
    let record = store.import_layout(&dir, None).unwrap();
    let rootfs = store.rootfs(&record).unwrap();
    assert_eq!(std::fs::read_to_string(rootfs.lookup("etc/app.conf").unwrap()).unwrap(), "compressed with zstd\n");
    assert!(rootfs.lookup("bin/busybox").is_some_and(|p| p.is_file()));

    // Valid zstd magic, garbage after it: an error naming the layer, no rootfs.
    let dir = fx.dir.path().join("layout-bad");
    let mut bad = zstd_layer(&[("x", b"y")]);
    let n = bad.len();
    bad[8..n].iter_mut().for_each(|b| *b = b.wrapping_mul(31).wrapping_add(7));
    let bad = put(&dir, &bad);
    let m = image(&dir, here(), &[&bad]);
    index(&dir, "zstd-bad:1", &[(&m, None)]);
    let record = store.import_layout(&dir, None).unwrap();
    let e = store.rootfs(&record).expect_err("a corrupt zstd layer unpacked");
    assert!(e.to_string().contains(&bad.digest), "the error does not name the layer: {e}");
    let leftovers: Vec<_> = std::fs::read_dir(fx.dir.path().join("images/tmp")).unwrap().flatten().collect();
    assert!(leftovers.is_empty(), "a half-unpacked layer was left: {leftovers:?}");
}

#[test]
fn images_sharing_a_layer_unpack_it_once_and_whiteouts_work_through_overlayfs() {
    let fx = Fixture::new();
    let root = fx.dir.path().join("images");
    let store = ImageStore::open(&root).unwrap();
    let base = layer_from(Some(&fx.rootfs), &[]);
    let tops: [(&str, Vec<u8>); 3] = [
        ("app-a", layer_from(None, &[("app", b"a")])),
        // A whiteout of a base file, and an opaque /etc holding one new file.
        (
            "app-b",
            layer_from(None, &[("app", b"b"), ("bin/.wh.cat", b""), ("etc/.wh..wh..opq", b""), ("etc/only", b"o")]),
        ),
        ("app-c", layer_from(None, &[("app", b"c")])),
    ];
    let mut rootfs = Vec::new();
    for (name, top) in &tops {
        let d = fx.dir.path().join(name);
        let (b, t) = (put(&d, &base), put(&d, top));
        let m = image(&d, here(), &[&b, &t]);
        index(&d, name, &[(&m, None)]);
        rootfs.push(store.rootfs(&store.import_layout(&d, None).unwrap()).unwrap());
    }
    // One base layer on disk for three images: the same directory, unpacked once.
    assert!(rootfs.iter().all(|r| r.layers[0] == rootfs[0].layers[0]));
    assert_eq!(std::fs::read_dir(root.join("layers")).unwrap().count(), 4, "base + 3 tops");

    let rt = fx.runtime();
    let script = "cat /app; echo; test -e /bin/cat && echo has-cat; ls /etc | tr '\n' ' '; echo";
    for (i, (name, _)) in tops.iter().enumerate() {
        let id = cid(name);
        rt.create(&CreateRequest {
            id: &id,
            spec: &sh(script),
            rootfs: rootfs[i].clone(),
            provenance: Default::default(),
        })
        .unwrap();
        assert_eq!(wait_exit(&rt, &id, Duration::from_secs(20)).code, 0, "{}", fx.log(&id));
        let log = fx.log(&id);
        let own = name.trim_start_matches("app-");
        assert!(log.contains(&format!("stdout {own}")), "{name}: {log}");
        if *name == "app-b" {
            assert!(!log.contains("has-cat"), "the whiteout did not hide /bin/cat: {log}");
            assert!(log.contains("stdout only"), "the opaque /etc shows lower files: {log}");
        } else {
            assert!(log.contains("has-cat") && log.contains("passwd"), "{name}: {log}");
        }
        rt.remove(&id).unwrap();
    }
    // The shared layer is as it was unpacked: nothing of b's whiteouts reached it.
    assert!(rootfs[0].layers[0].join("bin/cat").exists() && rootfs[0].layers[0].join("etc/passwd").exists());
}
