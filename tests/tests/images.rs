//! Real-world images: built the way users build them (umoci, setcap, a
//! multi-arch index with a buildx-style attestation entry, skopeo pushes in
//! OCI and Docker v2s2 formats) and pushed to Debian's docker-registry, then
//! run by a real controller and agent on their default settings. Each test
//! names the field report it settles (issue 14). Needs root (containers).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use baton_tests::*;

const DEVICE: &str = "pi-img";

fn umoci(args: &[&str]) {
    let out = Command::new("umoci").args(args).output().expect("umoci is not installed: .ci/run installs it");
    assert!(out.status.success(), "umoci {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// An OCI layout at `dir` with image `tag` made by umoci from a busybox
/// rootfs (one layer per `umoci insert`, as a user would build it).
fn umoci_image(dir: &Path, tag: &str, rootfs: &Path) -> PathBuf {
    let layout = dir.join("layout");
    if !layout.exists() {
        umoci(&["init", "--layout", layout.to_str().expect("utf-8 path")]);
    }
    let image = format!("{}:{tag}", layout.display());
    umoci(&["new", "--image", &image]);
    umoci(&["insert", "--image", &image, rootfs.to_str().expect("utf-8 path"), "/"]);
    layout
}

fn image_ref(layout: &Path, tag: &str) -> String {
    format!("{}:{tag}", layout.display())
}

/// Controller (tags pinned to digests, as by default), registry, one agent.
struct Setup {
    world: World,
    controller: Controller,
    registry: RegistryServer,
    _agent: Proc,
}

impl Setup {
    fn new() -> Self {
        let world = World::new();
        let controller = Controller::start(&world, None, &["--resolve-digests", "true"]);
        let registry = RegistryServer::start(&world);
        let agent = start_agent(&world, DEVICE, &controller.broker_url(), &[]);
        wait_for("the device", Duration::from_secs(20), || controller.device(DEVICE).map(|_| ()));
        Setup { world, controller, registry, _agent: agent }
    }

    fn server(&self) -> String {
        self.controller.server_url()
    }

    /// Applies `yaml` and waits for revision `revision` running healthy.
    fn run(&self, file: &str, yaml: &str, revision: u64) -> String {
        let (ok, out, err) =
            baton_cli(&self.server(), &["apply", "-f", self.world.write(file, yaml).to_str().expect("utf-8 path")]);
        assert!(ok, "apply {file}: {out}{err}");
        wait_for(&format!("{file} running"), Duration::from_secs(60), || {
            settled(&self.server(), yaml_name(yaml), revision, 1)
        });
        out
    }

    fn exec(&self, workload: &str, argv: &[&str]) -> String {
        let mut args = vec!["exec", "--device", DEVICE, workload, "--"];
        args.extend_from_slice(argv);
        let (ok, out, err) = baton_cli(&self.server(), &args);
        assert!(ok, "exec {argv:?} in {workload}: {out}{err}");
        out
    }
}

fn yaml_name(yaml: &str) -> &str {
    yaml.lines().find_map(|l| l.strip_prefix("name: ")).expect("name")
}

fn busybox(dir: &Path) -> PathBuf {
    baton_tests::fixtures::busybox_rootfs(dir).expect("busybox rootfs")
}

/// Field report 1: a multi-arch tag (an OCI index with this platform, others,
/// and a buildx attestation entry for unknown/unknown) pinned by the
/// controller to the index digest runs, and is pulled once; as a Docker
/// manifest list (skopeo --format v2s2) too.
#[test]
fn a_multi_arch_index_and_a_docker_manifest_list_run_on_default_settings() {
    let s = Setup::new();
    let dir = s.world.path().join("multi");
    let rootfs = busybox(&dir);
    let layout = umoci_image(&dir, "here", &rootfs);
    // Another platform's image (same bytes, another config) and an attestation.
    let here = oci_index_entry(&layout, "here");
    let mut other = here.clone();
    other["platform"] = serde_json::json!({"architecture": "riscv64", "os": "linux"});
    let mut attestation = here.clone();
    attestation["platform"] = serde_json::json!({"architecture": "unknown", "os": "unknown"});
    attestation["annotations"] = serde_json::json!({"vnd.docker.reference.type": "attestation-manifest"});
    let index = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [attestation, other, here],
    });
    add_index(&layout, "multi", &index);
    s.registry.push(&layout, "multi", "apps/multi:1");
    let image = format!("{}/apps/multi:1", s.registry.host);
    let out = s.run(
        "multi.yaml",
        &format!("name: multi\nimage: {image}\ncommand: [/bin/sh, -c, \"while true; do sleep 1; done\"]\n"),
        1,
    );
    assert!(out.contains("apps/multi:1 → sha256:"), "the tag was not pinned: {out}");
    let pulls = std::fs::read_to_string(s.world.path().join(format!("agent-{DEVICE}.log")))
        .unwrap_or_default()
        .matches("pulled")
        .count();
    assert_eq!(pulls, 1, "the image was pulled {pulls} times");

    // The same index as a Docker manifest list, pushed by skopeo in v2s2.
    let v2s2 = format!("docker://{}/apps/multi:v2s2", s.registry.host);
    run(
        "skopeo",
        &[
            "copy",
            "--all",
            "--format",
            "v2s2",
            "--dest-tls-verify=false",
            &format!("oci:{}:multi", layout.display()),
            &v2s2,
        ],
    );
    s.run(
        "list.yaml",
        &format!(
            "name: list\nimage: {}/apps/multi:v2s2\ncommand: [/bin/sh, -c, \"while true; do sleep 1; done\"]\n",
            s.registry.host
        ),
        1,
    );

    // Only other platforms: the controller says so at apply.
    let only_other = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [other_only(&layout)],
    });
    add_index(&layout, "elsewhere", &only_other);
    s.registry.push(&layout, "elsewhere", "apps/multi:elsewhere");
    let file =
        s.world.write("elsewhere.yaml", &format!("name: elsewhere\nimage: {}/apps/multi:elsewhere\n", s.registry.host));
    let (_, out, err) = baton_cli(&s.server(), &["apply", "-f", file.to_str().expect("utf-8 path")]);
    assert!(
        format!("{out}{err}").contains("has no image for linux/") && format!("{out}{err}").contains(DEVICE),
        "no warning about the missing platform: {out}{err}"
    );
}

/// The index entry umoci wrote for `tag` (with this machine's platform).
fn oci_index_entry(layout: &Path, tag: &str) -> serde_json::Value {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("test fixture")).expect("test fixture");
    let mut entry = index["manifests"]
        .as_array()
        .expect("test fixture")
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .cloned()
        .expect("tag in the layout");
    entry.as_object_mut().expect("test fixture").remove("annotations");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    entry["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
    entry
}

fn other_only(layout: &Path) -> serde_json::Value {
    let mut e = oci_index_entry(layout, "here");
    e["platform"] = serde_json::json!({"architecture": "riscv64", "os": "linux"});
    e
}

/// Stores `index` as a blob of `layout` and tags it `tag`.
fn add_index(layout: &Path, tag: &str, index: &serde_json::Value) {
    use sha2::Digest as _;
    let bytes = index.to_string().into_bytes();
    let hex: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(layout.join("blobs/sha256").join(&hex), &bytes).expect("test fixture");
    let path = layout.join("index.json");
    let mut top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("test fixture")).expect("test fixture");
    top["manifests"].as_array_mut().expect("test fixture").push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": format!("sha256:{hex}"), "size": bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }));
    std::fs::write(&path, top.to_string()).expect("test fixture");
}

/// Field reports 2, 3, 4 and 6: the image's USER (a name from its own
/// /etc/passwd, with its groups), a WORKDIR the image lacks (made, owned by
/// that user), a setcap'd binary binding port 80 as that user, file mtimes
/// as the layer has them; `baton exec` runs as the container's user, there.
#[test]
fn the_images_user_workdir_file_capabilities_and_mtimes_are_honoured() {
    let s = Setup::new();
    let dir = s.world.path().join("user");
    let rootfs = busybox(&dir);
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n")
        .expect("test fixture");
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\napp:x:1000:\nstaff:x:50:app\n").expect("test fixture");
    std::fs::create_dir_all(rootfs.join("srv/www")).expect("test fixture");
    // A directory the USER owns, where its named volume goes.
    std::fs::create_dir_all(rootfs.join("srv/state")).expect("test fixture");
    std::os::unix::fs::chown(rootfs.join("srv/state"), Some(1000), Some(1000)).expect("test fixture");
    std::fs::set_permissions(rootfs.join("srv/state"), std::os::unix::fs::PermissionsExt::from_mode(0o750))
        .expect("test fixture");
    std::fs::write(rootfs.join("srv/www/index.html"), "served as app\n").expect("test fixture");
    std::fs::copy(fixtures::BUSYBOX, rootfs.join("bin/busybox-cap")).expect("test fixture");
    run("setcap", &["cap_net_bind_service+ep", rootfs.join("bin/busybox-cap").to_str().expect("utf-8 path")]);
    std::fs::write(rootfs.join("etc/motd"), "old\n").expect("test fixture");
    run("touch", &["-h", "-d", "2001-01-01 00:00:00 UTC", rootfs.join("etc/motd").to_str().expect("utf-8 path")]);
    let layout = umoci_image(&dir, "app", &rootfs);
    let image = image_ref(&layout, "app");
    umoci(&["config", "--image", &image, "--config.user", "app", "--config.workingdir", "/srv/app/data"]);
    s.registry.push(&layout, "app", "apps/user:1");

    let yaml = format!(
        "name: app\nimage: {}/apps/user:1\nnetwork: none\ncommand: [/bin/busybox-cap, httpd, -f, -p, \"80\", -h, /srv/www]\n",
        s.registry.host
    );
    // Its own files (a secret's mode, 0400) and a fresh named volume are its
    // user's (a trial found both root's: unreadable, unwritable as USER app).
    let own = "volumes: [{path: /srv/state, name: app-state}]\nfiles: [{path: /etc/app.conf, mode: \"0400\", content: \"for app only\\n\"}]\n";
    s.run("app.yaml", &format!("{yaml}{own}"), 1);
    assert_eq!(s.exec("app", &["/bin/busybox", "cat", "/etc/app.conf"]), "for app only\n");
    assert_eq!(s.exec("app", &["/bin/busybox", "stat", "-c", "%u:%g:%a", "/srv/state"]).trim(), "1000:1000:750");
    assert_eq!(s.exec("app", &["/bin/sh", "-c", "echo kept > /srv/state/f && cat /srv/state/f"]), "kept\n");
    assert_eq!(s.exec("app", &["/bin/busybox", "id", "-u"]).trim(), "1000", "exec is not the image's user");
    let groups = s.exec("app", &["/bin/busybox", "id", "-G"]);
    assert!(groups.split_whitespace().any(|g| g == "50"), "the user's supplementary group is missing: {groups}");
    assert_eq!(s.exec("app", &["/bin/busybox", "pwd"]).trim(), "/srv/app/data");
    assert_eq!(s.exec("app", &["/bin/busybox", "stat", "-c", "%u:%g", "/srv/app/data"]).trim(), "1000:1000");
    assert_eq!(s.exec("app", &["/bin/sh", "-c", "echo $HOME"]).trim(), "/home/app");
    // Bound port 80 as uid 1000: the file capability survived the unpack.
    let page = s.exec("app", &["/bin/busybox", "wget", "-qO-", "http://127.0.0.1:80/index.html"]);
    assert_eq!(page, "served as app\n");
    assert_eq!(s.exec("app", &["/bin/busybox", "stat", "-c", "%Y", "/etc/motd"]).trim(), "978307200", "mtime lost");

    assert!(
        s.exec("app", &["/bin/busybox", "cat", "/proc/1/status"]).contains("NoNewPrivs:\t1"),
        "no_new_privileges is Baton's default"
    );

    // The manifest's user overrides the image's: numbers, or the image's names.
    let root = yaml
        .replace("name: app", "name: asroot")
        .replace("command:", "user: \"0:0\"\nallow_privilege_escalation: true\nseccomp_unconfined: true\ncommand:");
    s.run("asroot.yaml", &root, 1);
    assert_eq!(s.exec("asroot", &["/bin/busybox", "id", "-u"]).trim(), "0");
    // The workload's own process (pid 1 of the container's namespace).
    let status = s.exec("asroot", &["/bin/busybox", "cat", "/proc/1/status"]);
    assert!(status.contains("NoNewPrivs:\t0"), "{status}");
    let named = yaml.replace("name: app", "name: named").replace("command:", "user: \"app:staff\"\ncommand:");
    s.run("named.yaml", &named, 1);
    assert_eq!(s.exec("named", &["/bin/busybox", "id", "-u"]).trim(), "1000");
    assert_eq!(s.exec("named", &["/bin/busybox", "id", "-g"]).trim(), "50");

    // A USER the image does not have: a clear error, not a root container.
    umoci(&["config", "--image", &image, "--config.user", "ghost", "--tag", "ghost"]);
    s.registry.push(&layout, "ghost", "apps/user:ghost");
    let ghost = s.world.write("ghost.yaml", &format!("name: ghost\nimage: {}/apps/user:ghost\n", s.registry.host));
    let (ok, out, err) = baton_cli(&s.server(), &["apply", "-f", ghost.to_str().expect("utf-8 path")]);
    assert!(ok, "{out}{err}");
    wait_for("the unknown user named", Duration::from_secs(60), || {
        let w = describe_workload(&s.server(), "ghost")?;
        let e = w.devices.first()?.reported.as_ref()?.last_error.clone()?;
        e.contains("unable to find user ghost").then_some(())
    });

    // A program the image lacks, a working directory that is a file: said as such.
    for (name, extra, why) in [
        ("nope", "command: [/bin/nope]\n", "cannot run /bin/nope"),
        ("nodir", "working_dir: /etc/motd\ncommand: [/bin/sh]\n", "working directory /etc/motd"),
    ] {
        let yaml = format!("name: {name}\nimage: {}/apps/user:1\n{extra}", s.registry.host);
        apply_yaml(&s.server(), &s.world, &format!("{name}.yaml"), &yaml);
        wait_for(&format!("{name}'s start error"), Duration::from_secs(60), || {
            let w = describe_workload(&s.server(), name)?;
            let e = w.devices.first()?.reported.as_ref()?.last_error.clone()?;
            e.contains(why).then_some(())
        });
    }
}

/// A tag moved to other bytes and the same manifest applied again: the
/// controller pins the new digest, that is a new revision, the device runs
/// the new image, and the history tells the two apart.
#[test]
fn a_tag_moved_and_reapplied_is_a_new_revision_running_the_new_image() {
    let s = Setup::new();
    let yaml = format!(
        "name: moving\nimage: {}/apps/moving:latest\nnetwork: none\ncommand: [/bin/sh, -c, \"while true; do sleep 1; done\"]\n",
        s.registry.host
    );
    for (revision, text) in [(1, "one\n"), (2, "two\n")] {
        let dir = s.world.path().join(format!("moving-{revision}"));
        let rootfs = busybox(&dir);
        std::fs::write(rootfs.join("etc/motd"), text).expect("motd");
        let layout = umoci_image(&dir, "app", &rootfs);
        s.registry.push(&layout, "app", "apps/moving:latest");
        s.run("moving.yaml", &yaml, revision);
        assert_eq!(s.exec("moving", &["/bin/cat", "/etc/motd"]), text);
    }
    let w = describe_workload(&s.server(), "moving").expect("moving");
    assert_eq!(w.revisions.len(), 2);
    assert_ne!(w.revisions[0].digest, w.revisions[1].digest, "{:?}", w.revisions);
    assert_eq!(w.revisions[0].changes, ["image"], "{:?}", w.revisions);
    let (ok, text, _) = baton_cli(&s.server(), &["describe", "workload", "moving"]);
    let short = w.revisions[0].digest.trim_start_matches("sha256:")[..12].to_string();
    assert!(ok && text.contains(&short) && text.contains("changed: image"), "{text}");
}

/// Field reports 5 and 7: umoci's directory-replaced-by-a-file layer keeps
/// the file; an image with 60 layers (the copy fallback) keeps hard links.
#[test]
fn a_directory_replaced_by_a_file_and_hard_links_across_sixty_layers_survive() {
    let s = Setup::new();
    let dir = s.world.path().join("layers");
    let rootfs = busybox(&dir);
    std::fs::create_dir_all(rootfs.join("opt/dir2file/sub")).expect("test fixture");
    std::fs::write(rootfs.join("opt/dir2file/sub/x"), "x").expect("test fixture");
    std::fs::create_dir_all(rootfs.join("data")).expect("test fixture");
    std::fs::write(rootfs.join("data/a"), "linked\n").expect("test fixture");
    std::fs::hard_link(rootfs.join("data/a"), rootfs.join("data/b")).expect("test fixture");
    let layout = umoci_image(&dir, "app", &rootfs);
    let image = image_ref(&layout, "app");
    // umoci repack: the directory becomes a file in the next layer.
    let bundle = dir.join("bundle");
    umoci(&["unpack", "--image", &image, bundle.to_str().expect("utf-8 path")]);
    std::fs::remove_dir_all(bundle.join("rootfs/opt/dir2file")).expect("test fixture");
    std::fs::write(bundle.join("rootfs/opt/dir2file"), "now a file\n").expect("test fixture");
    umoci(&["repack", "--image", &image, bundle.to_str().expect("utf-8 path")]);
    s.registry.push(&layout, "app", "apps/layers:few");
    let yaml = |name: &str, tag: &str| {
        format!(
            "name: {name}\nimage: {}/apps/layers:{tag}\nnetwork: none\ncommand: [/bin/sh, -c, \"while true; do sleep 1; done\"]\n",
            s.registry.host
        )
    };
    s.run("few.yaml", &yaml("few", "few"), 1);
    assert_eq!(s.exec("few", &["/bin/cat", "/opt/dir2file"]), "now a file\n");

    // 58 more small layers: too many for one overlay mount.
    let extra = dir.join("extra");
    std::fs::create_dir_all(&extra).expect("test fixture");
    for i in 0..58 {
        let f = extra.join(format!("f{i}"));
        std::fs::write(&f, format!("{i}\n")).expect("test fixture");
        umoci(&[
            "insert",
            "--image",
            &image,
            "--no-history",
            f.to_str().expect("utf-8 path"),
            &format!("/layers/f{i}"),
        ]);
    }
    s.registry.push(&layout, "app", "apps/layers:many");
    s.run("many.yaml", &yaml("many", "many"), 1);
    let log = std::fs::read_to_string(s.world.path().join(format!("agent-{DEVICE}.log"))).unwrap_or_default();
    assert!(log.contains("too many layers for one overlay mount"), "the copy fallback was not taken");
    let inodes = s.exec("many", &["/bin/busybox", "stat", "-c", "%i %h", "/data/a", "/data/b"]);
    let lines: Vec<&str> = inodes.lines().collect();
    assert_eq!(lines.len(), 2, "{inodes}");
    assert_eq!(lines[0], lines[1], "two names of one file became two files: {inodes}");
    assert!(lines[0].ends_with(" 2"), "{inodes}");
    assert_eq!(s.exec("many", &["/bin/cat", "/layers/f57", "/opt/dir2file"]), "57\nnow a file\n");
}

/// Field report 9: air-gapped devices load what people have — a `docker
/// save` archive (written here by skopeo's docker-archive transport) and an
/// OCI layout tarball — and run it.
#[test]
fn docker_save_archives_and_oci_tarballs_load_and_run_air_gapped() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let dir = world.path().join("saved");
    let rootfs = busybox(&dir);
    std::fs::write(rootfs.join("etc/motd"), "loaded from an archive\n").expect("test fixture");
    let layout = umoci_image(&dir, "app", &rootfs);
    let archive = dir.join("saved.tar");
    run(
        "skopeo",
        &[
            "copy",
            &format!("oci:{}:app", layout.display()),
            &format!("docker-archive:{}:apps/saved:1", archive.display()),
        ],
    );
    let oci_tar = dir.join("oci.tar");
    run("tar", &["-C", layout.to_str().expect("utf-8 path"), "-cf", oci_tar.to_str().expect("utf-8 path"), "."]);
    let data = world.path().join(format!("agent-{DEVICE}"));
    let out = load_image(&data, &archive);
    assert!(out.contains("apps/saved:1"), "{out}");
    let out = Command::new(bin("baton-agent"))
        .args(["image", "load", "--name", "apps/oci:1"])
        .arg(&oci_tar)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .expect("test fixture");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _agent = start_agent(&world, DEVICE, &controller.broker_url(), &[]);
    let server = controller.server_url();
    for (name, image) in [("saved", "apps/saved:1"), ("oci", "apps/oci:1")] {
        apply_yaml(
            &server,
            &world,
            &format!("{name}.yaml"),
            &format!("name: {name}\nimage: {image}\nnetwork: none\ncommand: [/bin/sh, -c, \"while true; do sleep 1; done\"]\n"),
        );
        wait_for(&format!("{name} running"), Duration::from_secs(60), || settled(&server, name, 1, 1));
        let (ok, out, err) = baton_cli(&server, &["exec", "--device", DEVICE, name, "--", "/bin/cat", "/etc/motd"]);
        assert!(ok && out == "loaded from an archive\n", "{out}{err}");
    }
    // An archive that names a host file is refused, and nothing is stored.
    let evil = dir.join("evil");
    std::fs::create_dir_all(&evil).expect("test fixture");
    std::fs::write(evil.join("manifest.json"), r#"[{"Config":"c.json","RepoTags":["evil:1"],"Layers":["l.tar"]}]"#)
        .expect("test fixture");
    std::fs::write(evil.join("c.json"), "{}").expect("test fixture");
    std::os::unix::fs::symlink("/etc/shadow", evil.join("l.tar")).expect("test fixture");
    let evil_tar = dir.join("evil.tar");
    run("tar", &["-C", evil.to_str().expect("utf-8 path"), "-cf", evil_tar.to_str().expect("utf-8 path"), "."]);
    let out = Command::new(bin("baton-agent"))
        .args(["image", "load"])
        .arg(&evil_tar)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .expect("test fixture");
    assert!(!out.status.success(), "a symlink to a host file was loaded");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a regular file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Field report 8: a device keeps each layer once, unpacked — keyed by its
/// uncompressed digest, so the same layer pushed gzip- and zstd-compressed
/// is one directory — and no compressed blob once its layer is unpacked
/// and verified: the store holds at most 5 % more than the unpacked files.
#[test]
fn a_layer_is_kept_once_unpacked_however_it_was_compressed() {
    let s = Setup::new();
    let dir = s.world.path().join("disk");
    let rootfs = busybox(&dir);
    let layout = umoci_image(&dir, "app", &rootfs);
    s.registry.push(&layout, "app", "apps/disk:gzip");
    run(
        "skopeo",
        &[
            "copy",
            "--dest-tls-verify=false",
            "--dest-compress-format",
            "zstd",
            &format!("oci:{}:app", layout.display()),
            &format!("docker://{}/apps/disk:zstd", s.registry.host),
        ],
    );
    let yaml = |name: &str, tag: &str| {
        format!(
            "name: {name}\nimage: {}/apps/disk:{tag}\nnetwork: none\ncommand: [/bin/sh, -c, \"while true; do sleep 1; done\"]\n",
            s.registry.host
        )
    };
    s.run("gzip.yaml", &yaml("gz", "gzip"), 1);
    s.run("zstd.yaml", &yaml("zst", "zstd"), 1);
    let store = s.world.path().join(format!("agent-{DEVICE}/images"));
    let layers: Vec<_> = std::fs::read_dir(store.join("layers")).expect("layers").flatten().collect();
    assert_eq!(layers.len(), 1, "one layer, compressed two ways, unpacked {} times", layers.len());
    let (blobs, unpacked) = (dir_bytes(&store.join("blobs")), dir_bytes(&store.join("layers")));
    assert!(blobs < 64 << 10, "{blobs} bytes of blobs kept: a compressed layer stayed after its unpack");
    assert!(
        (blobs + unpacked) as f64 <= 1.05 * unpacked as f64,
        "store {} bytes for {unpacked} unpacked",
        blobs + unpacked
    );
    assert_eq!(s.exec("zst", &["/bin/echo", "shared"]), "shared\n");
}

/// A Debian bookworm userland as people build it (debootstrap minbase with
/// python3, ~260 MB), one umoci layer: python serves HTTP, and the 550
/// shipped `.pyc` files stay valid — their sources'
/// mtimes survived the unpack, so nothing is recompiled into the
/// container's writable layer (field report 4, on the real thing). Needs
/// Debian's mirror (deb.debian.org); ~1.5 min, most of it debootstrap.
#[test]
fn a_debootstrapped_debian_with_python_serves_and_recompiles_nothing() {
    let s = Setup::new();
    let dir = s.world.path().join("debian");
    let rootfs = dir.join("rootfs");
    run(
        "debootstrap",
        &[
            "--variant=minbase",
            "--include=python3",
            "bookworm",
            rootfs.to_str().expect("utf-8 path"),
            "http://deb.debian.org/debian",
        ],
    );
    std::fs::create_dir_all(rootfs.join("srv/www")).expect("www");
    std::fs::write(rootfs.join("srv/www/index.html"), "from debian\n").expect("index");
    let layout = umoci_image(&dir, "py", &rootfs);
    umoci(&[
        "config",
        "--image",
        &image_ref(&layout, "py"),
        "--config.workingdir",
        "/srv/www",
        "--config.cmd",
        "python3",
        "--config.cmd",
        "-m",
        "--config.cmd",
        "http.server",
        "--config.cmd",
        "8000",
    ]);
    std::fs::remove_dir_all(&rootfs).expect("free the rootfs");
    s.registry.push(&layout, "py", "apps/debian:py");
    s.run("py.yaml", &format!("name: py\nimage: {}/apps/debian:py\nnetwork: none\n", s.registry.host), 1);
    let fetch = "import urllib.request,time\nfor i in range(100):\n  try:\n    print(urllib.request.urlopen('http://127.0.0.1:8000/').read().decode(),end='');break\n  except OSError: time.sleep(0.1)";
    assert_eq!(s.exec("py", &["python3", "-c", fetch]), "from debian\n");
    // As root, python would write a fresh cache for any module whose source looks changed.
    assert_eq!(s.exec("py", &["id", "-un"]).trim(), "root");
    let upper = s.world.path().join(format!("agent-{DEVICE}/containers/py-0/upper"));
    let mut recompiled = Vec::new();
    let mut stack = vec![upper.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "pyc") {
                recompiled.push(p);
            }
        }
    }
    assert!(upper.is_dir(), "no writable layer at {}", upper.display());
    assert!(
        recompiled.is_empty(),
        "python recompiled {} shipped modules: {:?}",
        recompiled.len(),
        &recompiled[..recompiled.len().min(3)]
    );
}
