//! Field faults, disks: the agent's data dir on a small tmpfs (a nearly full
//! SD card). An image that cannot fit says so at once in `describe`, frees
//! what it wrote, never takes the space the agent needs for its own state,
//! keeps the running revision alive, and works once space is freed. Real
//! registry, real agent and containers. About 30 s (it pushes ~40 MiB).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use baton_tests::fixtures::{busybox_rootfs, oci_layout_layers, Layer};
use baton_tests::*;

const DEVICE: &str = "pi-d";

fn mount_tmpfs(dir: &Path, size: &str) {
    std::fs::create_dir_all(dir).expect("mount point");
    let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir).output();
    assert!(out.is_ok_and(|o| o.status.success()), "mount a tmpfs (root only; CI is root)");
}

/// Bytes that do not compress (xorshift).
fn noise(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// A tar holding one file.
fn tar_of(name: &str, data: &[u8]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path(name).expect("path");
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append(&h, data).expect("tar");
    tar.into_inner().expect("tar")
}

/// A tar holding one file of `n` zero bytes, as a zstd stream (no content
/// size in its frame, as a streaming compressor writes it): tiny, and big
/// once unpacked, which nothing can tell before unpacking it.
fn zstd_stream_of_zeros(n: u64) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path("zeros").expect("path");
    h.set_size(n);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append(&h, std::io::repeat(0).take_limit(n)).expect("tar");
    let tar = tar.into_inner().expect("tar");
    let mut zstd = Command::new(which("zstd").expect("zstd is not installed: .ci/run installs it"))
        .args(["-q", "-c", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("zstd");
    let mut stdin = zstd.stdin.take().expect("stdin");
    let feeder = std::thread::spawn(move || stdin.write_all(&tar));
    let out = zstd.wait_with_output().expect("zstd");
    feeder.join().expect("feeder").expect("feed zstd");
    out.stdout
}

trait TakeLimit: std::io::Read + Sized {
    fn take_limit(self, n: u64) -> std::io::Take<Self> {
        self.take(n)
    }
}
impl<R: std::io::Read> TakeLimit for R {}

/// The containers exit at once on SIGTERM: a stop shows within milliseconds.
fn web(image: &str, script: &str) -> String {
    format!(
        "name: web\nimage: {image}\ncommand: [/bin/sh, -c, \"trap 'exit 0' TERM; {script}\"]\nrollout: {{min_ready: 1}}\n"
    )
}

/// The running revision is not stopped: still alive 2 s after the failure
/// was reported (a stop would show within milliseconds, see `web`).
fn still_running(pid: i32) {
    assert!(
        wait_until(Duration::from_secs(2), || (!alive(pid)).then_some(())).is_none(),
        "the running revision was stopped"
    );
}

/// The device's LAST ERROR for `web` in `describe workload`.
fn last_error(server: &str) -> Option<String> {
    describe_workload(server, "web")?.devices.first()?.reported.as_ref()?.last_error.clone()
}

fn leftovers(data: &Path) -> Vec<String> {
    std::fs::read_dir(data.join("images/tmp"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Symptom: a revision whose image did not fit showed only `pulling` for two
/// minutes, then a rollback; the abandoned partial download kept the disk
/// full, so the agent could no longer persist its state and even a tiny
/// later revision failed until someone deleted the file by hand.
#[test]
fn an_image_that_does_not_fit_says_so_frees_what_it_wrote_and_works_once_space_is_freed() {
    let world = World::new();
    let data = world.path().join(format!("agent-{DEVICE}"));
    // 112 MiB: the agent keeps 64 MiB free for itself, so images get 48.
    mount_tmpfs(&data, "112m");
    let registry = RegistryServer::start(&world);
    let rootfs = busybox_rootfs(&world.path().join("busybox")).expect("rootfs");
    let push = |name: &str, layers: &[Layer<'_>]| {
        let dir = world.path().join(format!("layout-{}", name.replace(':', "-")));
        let layout = oci_layout_layers(&dir, layers, name).expect("layout");
        registry.push(&layout, name, &format!("field/{name}"));
        format!("{}/field/{name}", registry.host)
    };
    let small = push("small:1", &[Layer::Dir(&rootfs)]);
    // Uncompressed (as `docker save` layers are): gzipping 40 MiB in a debug build takes most of a minute.
    let big = push(
        "big:1",
        &[Layer::Dir(&rootfs), Layer::Raw("application/vnd.oci.image.layer.v1.tar", tar_of("noise", &noise(40 << 20)))],
    );
    let zeros = push(
        "zeros:1",
        &[
            Layer::Dir(&rootfs),
            Layer::Raw("application/vnd.oci.image.layer.v1.tar+zstd", zstd_stream_of_zeros(96 << 20)),
        ],
    );

    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let mut agent = start_agent(&world, DEVICE, &controller.broker_url(), &[]);
    apply_yaml(&server, &world, "web.yaml", &web(&small, "echo one; while true; do sleep 0.2; done"));
    wait_for("revision 1", Duration::from_secs(40), || settled(&server, "web", 1, 1));
    let run = world.path().join(format!("run-{DEVICE}"));
    let pid = wait_for("its pid", Duration::from_secs(10), || running_pid(&run, "web-0"));

    // 40 MiB that do not compress: refused before a byte is downloaded.
    apply_yaml(&server, &world, "web.yaml", &web(&big, "echo two; while true; do sleep 0.2; done"));
    let e = wait_for("the error in describe", Duration::from_secs(20), || {
        last_error(&server).filter(|e| e.contains("revision 2") && e.contains("no space on the data disk"))
    });
    assert!(e.contains("MiB are free") && e.contains("kept for the agent's own state"), "{e}");
    still_running(pid);
    assert!(leftovers(&data).is_empty(), "left behind: {:?}", leftovers(&data));

    // 96 MiB of zeros in a zstd stream that does not say its size: found
    // out while unpacking, stopped at the agent's reserve, the rest removed.
    apply_yaml(&server, &world, "web.yaml", &web(&zeros, "echo three; while true; do sleep 0.2; done"));
    let e = wait_for("the unpack stopped", Duration::from_secs(30), || {
        last_error(&server).filter(|e| e.contains("revision 3") && e.contains("unpacking layer"))
    });
    assert!(e.contains("no space on the data disk"), "{e}");
    still_running(pid);
    wait_for("nothing left of the unpack", Duration::from_secs(10), || leftovers(&data).is_empty().then_some(()));
    let free = nix_free(&data);
    assert!(free >= 60 << 20, "the agent's reserve was taken: {} MiB free", free >> 20);

    // The device still writes its own state and runs what fits.
    apply_yaml(&server, &world, "web.yaml", &web(&small, "echo four; while true; do sleep 0.2; done"));
    wait_for("revision 4 (small) running", Duration::from_secs(40), || settled(&server, "web", 4, 1));
    let (ok, out, err) = baton_cli(&server, &["exec", "--device", DEVICE, "web", "--", "echo", "alive"]);
    assert!(ok && out.contains("alive"), "{out}{err}");

    // Space freed: the big image runs.
    let out = Command::new("mount").args(["-o", "remount,size=512m"]).arg(&data).output().expect("remount");
    assert!(out.status.success());
    apply_yaml(&server, &world, "web.yaml", &web(&big, "echo five; while true; do sleep 0.2; done"));
    wait_for("revision 5 (big) running", Duration::from_secs(60), || settled(&server, "web", 5, 1));
    assert!(agent.is_running(), "the agent died on a full disk");
}

fn nix_free(dir: &Path) -> u64 {
    let out = Command::new("df").args(["--output=avail", "-B1"]).arg(dir).output().expect("df");
    String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or(0)
}

/// The controller's data dir full: an apply is refused with a clear error
/// and stores nothing of itself (in memory either); once space is freed,
/// the same apply works.
#[test]
fn a_full_controller_disk_refuses_an_apply_clearly_and_stores_nothing_half() {
    let world = World::new();
    let data = world.path().join("controller");
    mount_tmpfs(&data, "8m");
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let _sim = start_simulator(&world, "c", 2, &controller.broker_url(), &[]);
    wait_for("2 devices", Duration::from_secs(30), || (controller.devices().len() == 2).then_some(()));
    apply_yaml(&server, &world, "one.yaml", "name: one\nimage: 127.0.0.1:9/one:1\n");

    // Fill the disk.
    let filler = data.join("filler");
    let mut f = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![1u8; 1 << 16];
    while f.write_all(&chunk).is_ok() {}
    drop(f);

    let manifest = world.path().join("two.yaml");
    let text: String = (0..20).map(|i| format!("---\nname: two-{i}\nimage: 127.0.0.1:9/two:1\n")).collect();
    std::fs::write(&manifest, text).expect("manifest");
    let (ok, out, err) = baton_cli(&server, &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(!ok, "applied on a full disk: {out}");
    assert!(err.contains("data disk is full") && err.contains("nothing of this was stored"), "{err}");
    let (_, list, _) = baton_cli(&server, &["get", "workloads"]);
    assert!(!list.contains("two-"), "half an apply is visible: {list}");
    assert_eq!(get_json::<serde_json::Value>(controller.http, "/healthz").expect("healthz")["status"], "ok");

    std::fs::remove_file(&filler).expect("free space");
    let (ok, out, err) = baton_cli(&server, &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(ok, "{out}{err}");
    let (_, list, _) = baton_cli(&server, &["get", "workloads"]);
    assert_eq!(list.matches("two-").count(), 20, "{list}");
}
