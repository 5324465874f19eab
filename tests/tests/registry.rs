//! Pulling from a real registry (Debian's docker-registry, images pushed with
//! skopeo): verified, deduplicated, resumed after a cut connection, and used
//! by an agent for a workload applied through the controller.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use baton_agent::image::manifest::Platform;
use baton_agent::image::registry::{Registry, RegistryConfig};
use baton_agent::image::ImageStore;
use baton_tests::*;

fn pushed_busybox(world: &World, registry: &RegistryServer, repo_tag: &str) {
    pushed_busybox_as(world, registry, repo_tag, None);
}

/// As `pushed_busybox`, with `user:password` for a registry that wants them.
fn pushed_busybox_as(world: &World, registry: &RegistryServer, repo_tag: &str, creds: Option<&str>) {
    let dir = world.path().join(repo_tag.replace(['/', ':'], "_"));
    let rootfs = baton_tests::fixtures::busybox_rootfs(&dir).expect("rootfs");
    let layout = baton_tests::fixtures::oci_layout(&dir.join("layout"), &rootfs, "e2e").expect("layout");
    registry.push_as(&layout, "e2e", repo_tag, creds);
}

#[test]
fn pull_verifies_unpacks_and_a_second_pull_downloads_nothing() {
    let world = World::new();
    let registry = RegistryServer::start(&world);
    pushed_busybox(&world, &registry, "test/busybox:1");
    let store = ImageStore::open(world.path().join("images")).expect("store");
    let client = Registry::new(RegistryConfig::default());
    let reference = format!("127.0.0.1:{}/test/busybox:1", registry.port);
    let (record, stats) = client.pull(&store, &reference, &Platform::current()).expect("pull");
    assert_eq!(stats.blobs_fetched, 2, "config and one layer");
    assert!(stats.bytes_downloaded > 500_000, "{stats:?}");
    let rootfs = store.rootfs(&record).expect("rootfs");
    assert!(rootfs.lookup("bin/busybox").is_some_and(|p| p.is_file()));

    let (again, stats) = client.pull(&store, &reference, &Platform::current()).expect("second pull");
    assert_eq!(again.manifest, record.manifest);
    assert_eq!((stats.blobs_fetched, stats.bytes_downloaded), (0, 0), "downloaded again");

    let missing = format!("127.0.0.1:{}/test/nope:1", registry.port);
    let e = client.pull(&store, &missing, &Platform::current()).expect_err("pulled a missing image").to_string();
    assert!(e.contains("test/nope"), "{e}");
}

#[derive(Clone, Copy)]
enum Sabotage {
    /// Close the connection after this many response bytes.
    Cut(u64),
    /// Flip the byte at this offset of the response.
    Flip(u64),
}

/// A loopback proxy that sabotages the first response longer than the
/// offset; later connections pass through untouched.
fn sabotaging_proxy(upstream: u16, sabotage: Sabotage) -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let done = Arc::new(AtomicU64::new(0));
    let done2 = done.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().take(64) {
            let Ok(mut client) = client else { continue };
            let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
            let (mut c2, mut s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
            });
            let done3 = done2.clone();
            std::thread::spawn(move || {
                let at = match sabotage {
                    Sabotage::Cut(n) | Sabotage::Flip(n) => n,
                };
                let mut sent = 0u64;
                let mut buf = [0u8; 16 * 1024];
                loop {
                    let n = match server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if sent + n as u64 > at
                        && done3.load(Ordering::SeqCst) == 0
                        && done3.fetch_add(1, Ordering::SeqCst) == 0
                    {
                        let i = (at - sent) as usize;
                        match sabotage {
                            Sabotage::Cut(_) => {
                                let _ = client.write_all(&buf[..i]);
                                let _ = client.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                            Sabotage::Flip(_) => buf[i] ^= 0xff,
                        }
                    }
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n as u64;
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (port, done)
}

#[test]
fn a_connection_cut_mid_layer_resumes_without_downloading_a_byte_twice() {
    let world = World::new();
    let registry = RegistryServer::start(&world);
    pushed_busybox(&world, &registry, "test/busybox:1");
    let (proxy, cuts) = sabotaging_proxy(registry.port, Sabotage::Cut(300_000));
    let store = ImageStore::open(world.path().join("images")).expect("store");
    let client = Registry::new(RegistryConfig::default());
    let (record, stats) = client
        .pull(&store, &format!("127.0.0.1:{proxy}/test/busybox:1"), &Platform::current())
        .expect("pull through the cut");
    assert_eq!(cuts.load(Ordering::SeqCst), 1, "the proxy never cut: the test proves nothing");
    // Downloaded bytes = the config and layer blobs kept, exactly: nothing fetched twice.
    let stored: u64 = std::fs::read_dir(world.path().join("images/blobs/sha256"))
        .expect("blobs")
        .flatten()
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum();
    let manifest = std::fs::metadata(store.blob_path(&record.manifest)).map_or(0, |m| m.len());
    assert_eq!(stats.bytes_downloaded, stored - manifest, "{stats:?}");
    assert_eq!(stats.blobs_fetched, 2);
    assert!(store.rootfs(&record).expect("rootfs").lookup("bin/busybox").is_some_and(|p| p.is_file()));
    assert_eq!(std::fs::read_dir(world.path().join("images/tmp")).expect("tmp").count(), 0, "partial files left");
}

#[test]
fn an_applied_workload_is_pulled_by_the_agent_and_runs() {
    let world = World::new();
    let registry = RegistryServer::start(&world);
    pushed_busybox(&world, &registry, "apps/busybox:1");
    let controller = Controller::start(&world, None, &["--resolve-digests", "true"]);
    let mut agent = start_agent(&world, "pi-pull", &controller.broker_url(), &[]);
    let manifest = world.path().join("app.yaml");
    std::fs::write(
        &manifest,
        format!(
            "name: app\nimage: 127.0.0.1:{}/apps/busybox:1\ncommand: [/bin/sh, -c, 'echo pulled-and-running; while true; do sleep 0.2; done']\n",
            registry.port
        ),
    )
    .expect("manifest");
    let server = controller.server_url();
    let (ok, out, err) = baton_cli(&server, &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(ok && out.contains("apps/busybox:1 → sha256:"), "the tag was not pinned: {out}{err}");
    wait_for("app running from the registry", Duration::from_secs(60), || {
        let (_, out, _) = baton_cli(&server, &["get", "workloads", "-o", "json"]);
        let w: Vec<baton_controller::view::WorkloadView> = serde_json::from_str(&out).ok()?;
        (w.first()?.running() == 1).then_some(())
    });
    wait_for("its log", Duration::from_secs(10), || {
        let (ok, out, _) = baton_cli(&server, &["logs", "app", "--device", "pi-pull"]);
        (ok && out.contains("pulled-and-running")).then_some(())
    });
    // The device pulled exactly the pinned manifest.
    let (_, out, _) = baton_cli(&server, &["describe", "workload", "app", "-o", "json"]);
    let w: baton_controller::view::WorkloadView = serde_json::from_str(&out).expect("json");
    let pinned = w.revisions[0].digest.clone();
    let ls = Command::new(bin("baton-agent"))
        .args(["image", "ls", "--data-dir"])
        .arg(world.path().join("agent-pi-pull"))
        .output()
        .expect("image ls");
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(pinned.starts_with("sha256:") && ls.contains(&pinned), "pinned {pinned}, device has:\n{ls}");
    // Applying again resolves to the same digest: nothing changes.
    let (ok, out, _) = baton_cli(&server, &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(ok && out.contains("unchanged (revision 1)"), "{out}");

    // Revision 2 names a tag the registry does not have yet: revision 1 keeps
    // running (the old container is stopped only once the new image is here),
    // and the device says why it waits.
    let report = |server: &str| -> Option<baton_protocol::WorkloadStatus> {
        let (_, out, _) = baton_cli(server, &["describe", "workload", "app", "-o", "json"]);
        let w: baton_controller::view::WorkloadView = serde_json::from_str(&out).ok()?;
        w.devices.first()?.reported.clone()
    };
    std::fs::write(
        &manifest,
        format!(
            "name: app\nimage: 127.0.0.1:{}/apps/busybox:2\ncommand: [/bin/sh, -c, 'echo pulled-and-running; while true; do sleep 0.2; done']\nhealth_deadline: 600\n",
            registry.port
        ),
    )
    .expect("manifest");
    let (ok, out, err) = baton_cli(&server, &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(ok && out.contains("cannot resolve") && out.contains("devices pull the tag"), "{out}{err}");
    let waiting = wait_for("the device to report the missing image", Duration::from_secs(60), || {
        report(&server).filter(|r| r.last_error.as_deref().is_some_and(|e| e.starts_with("revision 2:")))
    });
    assert_eq!(
        (waiting.revision, waiting.phase, waiting.restarts),
        (1, baton_protocol::Phase::Running, 0),
        "{waiting:?}"
    );
    // Once the tag exists, the retried pull succeeds and revision 2 replaces revision 1.
    pushed_busybox(&world, &registry, "apps/busybox:2");
    wait_for("revision 2 running", Duration::from_secs(90), || {
        report(&server).filter(|r| r.revision == 2 && r.phase == baton_protocol::Phase::Running)
    });
    assert!(agent.is_running());
}

#[test]
fn a_blob_corrupted_in_transit_is_refused_and_nothing_of_it_is_kept() {
    let world = World::new();
    let registry = RegistryServer::start(&world);
    pushed_busybox(&world, &registry, "test/busybox:1");
    let (proxy, flips) = sabotaging_proxy(registry.port, Sabotage::Flip(200_000));
    let store = ImageStore::open(world.path().join("images")).expect("store");
    let client = Registry::new(RegistryConfig::default());
    let reference = format!("127.0.0.1:{proxy}/test/busybox:1");
    let e = client.pull(&store, &reference, &Platform::current()).expect_err("a corrupt layer was accepted");
    assert_eq!(flips.load(Ordering::SeqCst), 1, "the proxy never corrupted anything: the test proves nothing");
    assert!(matches!(e, baton_agent::image::ImageError::DigestMismatch { .. }), "{e}");
    assert_eq!(std::fs::read_dir(world.path().join("images/tmp")).expect("tmp").count(), 0, "corrupt bytes kept");
    assert!(store.images().is_empty(), "an image was recorded");
    // The next attempt (the proxy is honest now) succeeds.
    let (record, _) = client.pull(&store, &reference, &Platform::current()).expect("retry");
    assert!(store.rootfs(&record).expect("rootfs").lookup("bin/busybox").is_some_and(|p| p.is_file()));
}

#[test]
fn a_registry_with_htpasswd_auth_needs_and_accepts_credentials() {
    let world = World::new();
    let registry = RegistryServer::start_with_auth(&world, "fleet", "s3cret");
    pushed_busybox_as(&world, &registry, "private/busybox:1", Some("fleet:s3cret"));
    let reference = format!("127.0.0.1:{}/private/busybox:1", registry.port);
    let store = ImageStore::open(world.path().join("images")).expect("store");

    let e = Registry::new(RegistryConfig::default())
        .pull(&store, &reference, &Platform::current())
        .expect_err("pulled anonymously");
    assert!(e.to_string().contains("username and password"), "{e}");
    let wrong = RegistryConfig {
        credentials: [(format!("127.0.0.1:{}", registry.port), ("fleet".to_string(), "nope".to_string()))].into(),
        ..Default::default()
    };
    let e =
        Registry::new(wrong).pull(&store, &reference, &Platform::current()).expect_err("pulled with a wrong password");
    assert!(e.to_string().contains("access denied"), "{e}");
    let right = RegistryConfig {
        credentials: [(format!("127.0.0.1:{}", registry.port), ("fleet".to_string(), "s3cret".to_string()))].into(),
        ..Default::default()
    };
    let (record, stats) =
        Registry::new(right).pull(&store, &reference, &Platform::current()).expect("pull with credentials");
    assert_eq!(stats.blobs_fetched, 2);
    assert!(store.rootfs(&record).expect("rootfs").lookup("bin/busybox").is_some_and(|p| p.is_file()));
}

#[test]
fn a_multi_arch_index_in_a_registry_gives_each_device_its_platform() {
    use baton_tests::fixtures::{oci_multiarch_layout, Layer};
    let world = World::new();
    let registry = RegistryServer::start(&world);
    let images = [("amd64", None), ("arm64", None), ("arm", Some("v7"))].map(|(arch, variant)| {
        (arch, variant, vec![Layer::Files(vec![("platform", format!("{arch}{}", variant.unwrap_or("")).into_bytes())])])
    });
    let layout = oci_multiarch_layout(&world.path().join("multi"), &images, "multi").expect("layout");
    registry.push(&layout, "multi", "apps/multi:1");
    let reference = format!("127.0.0.1:{}/apps/multi:1", registry.port);
    let client = Registry::new(RegistryConfig::default());
    let platform = |arch: &str, variant: Option<&str>| Platform {
        architecture: arch.into(),
        os: "linux".into(),
        variant: variant.map(str::to_string),
    };
    for (arch, variant, expect) in [("amd64", None, "amd64"), ("arm64", None, "arm64"), ("arm", Some("v7"), "armv7")] {
        let store = ImageStore::open(world.path().join(format!("images-{expect}"))).expect("store");
        let (record, _) = client.pull(&store, &reference, &platform(arch, variant)).expect("pull");
        let rootfs = store.rootfs(&record).expect("rootfs");
        assert_eq!(
            std::fs::read_to_string(rootfs.lookup("platform").expect("platform file")).expect("platform file"),
            expect
        );
    }
    let store = ImageStore::open(world.path().join("images-riscv")).expect("store");
    let e = client.pull(&store, &reference, &platform("riscv64", None)).expect_err("pulled for a missing platform");
    assert!(matches!(e, baton_agent::image::ImageError::NoPlatform { .. }), "{e}");
    assert!(e.to_string().contains("arm64"), "the error does not say what the index has: {e}");
}

#[test]
fn the_controller_pins_private_images_with_registry_credentials() {
    let world = World::new();
    let registry = RegistryServer::start_with_auth(&world, "fleet", "s3cret");
    pushed_busybox_as(&world, &registry, "private/busybox:1", Some("fleet:s3cret"));
    let manifest = world.path().join("app.yaml");
    std::fs::write(&manifest, format!("name: app\nimage: 127.0.0.1:{}/private/busybox:1\n", registry.port))
        .expect("manifest");
    let apply = |c: &Controller| baton_cli(&c.server_url(), &["apply", "-f", manifest.to_str().expect("utf-8")]);

    // Without credentials the tag cannot be pinned, and the apply says so.
    let elsewhere = World::new();
    let anonymous = Controller::start(&elsewhere, None, &["--resolve-digests", "true"]);
    let (ok, out, err) = apply(&anonymous);
    assert!(ok && out.contains("cannot resolve"), "{out}{err}");

    let pw = world.path().join("registry.pw");
    std::fs::write(&pw, "s3cret\n").expect("password file");
    let auth = format!("127.0.0.1:{}=fleet:{}", registry.port, pw.display());
    let controller = Controller::start(&world, None, &["--resolve-digests", "true", "--registry-auth", &auth]);
    let (ok, out, err) = apply(&controller);
    assert!(ok && out.contains("private/busybox:1 → sha256:"), "the private tag was not pinned: {out}{err}");
    // A bad argument is a clear start-up error.
    let out = Command::new(bin("baton"))
        .args(["server", "--registry-auth", "no-equals-sign", "--data-dir"])
        .arg(world.path().join("x"))
        .output()
        .expect("baton server");
    assert!(String::from_utf8_lossy(&out.stderr).contains("HOST=USER:PASSWORD_FILE"));
}

#[test]
fn a_registry_with_a_private_ca_is_trusted_through_its_configured_ca_only() {
    let world = World::new();
    let (registry, ca) = RegistryServer::start_tls(&world);
    pushed_busybox(&world, &registry, "tls/busybox:1");
    let reference = format!("{}/tls/busybox:1", registry.host);
    let store = ImageStore::open(world.path().join("images")).expect("store");

    // Not loopback, so HTTPS; the web PKI roots do not know this CA.
    let e = Registry::new(RegistryConfig::default())
        .pull(&store, &reference, &Platform::current())
        .expect_err("pulled through a CA nobody configured")
        .to_string();
    assert!(e.to_lowercase().contains("certificate") || e.contains("UnknownIssuer"), "{e}");
    // A CA configured for another registry does not help this one.
    let pem = std::fs::read(&ca).expect("ca.pem");
    let elsewhere =
        RegistryConfig { ca_pem: [("registry.lan:5000".to_string(), pem.clone())].into(), ..Default::default() };
    assert!(Registry::new(elsewhere).pull(&store, &reference, &Platform::current()).is_err());
    // Configured for it (agent.toml `registry_ca`): pulled and verified over TLS.
    let config = RegistryConfig { ca_pem: [(registry.host.clone(), pem)].into(), ..Default::default() };
    let (record, stats) = Registry::new(config).pull(&store, &reference, &Platform::current()).expect("pull over TLS");
    assert_eq!(stats.blobs_fetched, 2);
    assert!(store.rootfs(&record).expect("rootfs").lookup("bin/busybox").is_some());

    // The controller pins the tag with --registry-ca, and cannot without it.
    let manifest = world.path().join("app.yaml");
    std::fs::write(&manifest, format!("name: app\nimage: {reference}\n")).expect("manifest");
    let apply = |c: &Controller| baton_cli(&c.server_url(), &["apply", "-f", manifest.to_str().expect("utf-8")]);
    let other = World::new();
    let (ok, out, err) = apply(&Controller::start(&other, None, &["--resolve-digests", "true"]));
    assert!(ok && out.contains("cannot resolve"), "{out}{err}");
    let flag = format!("{}={}", registry.host, ca.display());
    let controller = Controller::start(&world, None, &["--resolve-digests", "true", "--registry-ca", &flag]);
    let (ok, out, err) = apply(&controller);
    assert!(ok && out.contains(&format!("{reference} → sha256:")), "the tag was not pinned over TLS: {out}{err}");
    // A file with no certificate is a clear start-up error.
    let bad = format!("{}={}", registry.host, manifest.display());
    let out = Command::new(bin("baton"))
        .args(["server", "--registry-ca", &bad, "--data-dir"])
        .arg(world.path().join("x"))
        .output()
        .expect("baton server");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("no PEM certificate"), "{text}");
}

/// Symptom (a new user's trial): the registry down during an update of a
/// workload with a secret that must stop before its successor starts (a
/// named volume): the pull kept failing and the old container kept running
/// — until the health deadline, when the device went back to that very
/// revision and the controller re-sealed its secret for the rollback: new
/// bytes, another fingerprint, and the healthy container was stopped and
/// started again. Now a seal is reused across revisions, and nothing of the
/// running revision changes.
#[test]
fn a_registry_down_during_an_update_leaves_the_running_container_alone() {
    let world = World::new();
    let registry = RegistryServer::start(&world);
    pushed_busybox(&world, &registry, "apps/busybox:1");
    let controller = Controller::start(&world, None, &["--resolve-digests", "true"]);
    let server = controller.server_url();
    // Secrets are written only to a tmpfs run dir, as /run is on a device.
    let tmpfs = TmpfsRunDir::mount(&world, "pi-out");
    let run = tmpfs.0.clone();
    let _agent = start_agent(&world, "pi-out", &controller.broker_url(), &[]);
    wait_for("pi-out online with a sealing key", Duration::from_secs(30), || {
        controller.device("pi-out").filter(|d| d.inventory.as_ref().is_some_and(|i| i.sealing_key.len() == 32))
    });
    let (ok, out, err) = baton_cli(&server, &["secret", "create", "app-token", "--from-literal", "s3cr3t"]);
    assert!(ok, "{out}{err}");
    let manifest = world.path().join("app.yaml");
    let spec = |tag: &str| {
        format!(
            "name: app\nimage: 127.0.0.1:{}/apps/busybox:{tag}\ncommand: [/bin/sh, -c, 'while true; do sleep 0.2; done']\n\
             volumes: [{{path: /data, name: app-data}}]\nsecrets: [{{name: app-token, path: /run/secrets/token}}]\n\
             health_deadline: 12\n",
            registry.port
        )
    };
    std::fs::write(&manifest, spec("1")).expect("manifest");
    let (ok, out, err) = baton_cli(&server, &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(ok, "{out}{err}");
    wait_for("revision 1 healthy", Duration::from_secs(60), || settled(&server, "app", 1, 1));
    let pid = wait_for("its pid", Duration::from_secs(10), || running_pid(&run, "app-0"));
    // Proven on the device (it ran healthy past its settle time): what a rollback goes back to.
    let proven = world.path().join("agent-pi-out/state/proven.bin");
    wait_for("revision 1 proven", Duration::from_secs(30), || proven.exists().then_some(()));

    // Revision 2's tag is nowhere: the pull fails until the health deadline.
    std::fs::write(&manifest, spec("2")).expect("manifest");
    let (ok, out, err) = baton_cli(&server, &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(ok, "{out}{err}");
    wait_for("the device to give revision 2 up", Duration::from_secs(60), || {
        let w = describe_workload(&server, "app")?;
        let r = w.devices.first()?.reported.clone()?;
        (r.phase == baton_protocol::Phase::RolledBack).then_some(r)
    });
    // The controller sends the device back to revision 1 (the rollout stops).
    wait_for("revision 1 asked again", Duration::from_secs(30), || {
        let w = describe_workload(&server, "app")?;
        let r = w.rollout.as_ref()?;
        (w.devices.first()?.desired_revision == 1 && !r.state.active()).then_some(())
    });
    wait_for("revision 1 reported settled again", Duration::from_secs(30), || settled(&server, "app", 1, 1));
    let log = std::fs::read_to_string(world.path().join("agent-pi-out.log")).unwrap_or_default();
    assert!(!log.contains("stopping for replacement"), "revision 1's container was replaced:\n{log}");
    assert_eq!(running_pid(&run, "app-0"), Some(pid), "revision 1's container was replaced");
    assert!(alive(pid));
    let r = describe_workload(&server, "app").and_then(|w| w.devices.first()?.reported.clone()).expect("report");
    assert_eq!((r.revision, r.restarts), (1, 0), "{r:?}");
}
