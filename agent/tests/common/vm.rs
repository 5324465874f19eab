//! A small VM with only cgroup v2, as on Raspberry Pi OS, for the container
//! tests: Debian's kernel (`tests/vm/kernel.sh` unpacks it; no install) under
//! qemu with TCG (no nested KVM needed), this machine's root filesystem
//! read-only over 9p, tmpfs on /run and /mnt (the tests' TMPDIR), cgroup2 at
//! /sys/fs/cgroup with memory, pids and cpu enabled. A test binary runs its
//! own other tests inside (`run_this_binary_in_a_cgroup_v2_vm`).
//!
//! `BATON_VM_KERNEL_DIR` names the unpacked kernel; `BATON_REQUIRE_VM=1`
//! (set by `.ci/run`) makes a missing kernel or qemu a failure, not a skip.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs this test binary's tests, but those named in `skip`, in the VM and
/// returns its console once they all passed; `None` when the VM cannot run
/// here and `BATON_REQUIRE_VM` is not set.
pub fn run_this_binary_in_a_cgroup_v2_vm(skip: &[&str]) -> Option<String> {
    let required = std::env::var_os("BATON_REQUIRE_VM").is_some();
    let kernel_dir = std::env::var_os("BATON_VM_KERNEL_DIR").map(PathBuf::from);
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    let (Some(kernel_dir), true, true) = (kernel_dir, qemu.exists(), cfg!(target_arch = "x86_64")) else {
        assert!(!required, "BATON_REQUIRE_VM is set but BATON_VM_KERNEL_DIR or qemu-system-x86_64 is missing");
        eprintln!("skipping: set BATON_VM_KERNEL_DIR (tests/vm/kernel.sh) and install qemu-system-x86");
        return None;
    };
    assert!(nix::unistd::geteuid().is_root(), "container tests need root (CI runs them as root)");
    let vm = Vm::new(&kernel_dir);
    let exe = std::env::current_exe().expect("this test binary");
    let skips: String = skip.iter().map(|s| format!(" --skip {s}")).collect();
    let script = format!(
        "set -e\n\
         ip link set lo up && ip link add dummy0 type dummy && ip link set dummy0 up\n\
         echo \"+memory +pids +cpu\" > /sys/fs/cgroup/cgroup.subtree_control\n\
         echo \"cgroup $(stat -fc %T /sys/fs/cgroup): $(cat /sys/fs/cgroup/cgroup.subtree_control)\"\n\
         exec {} --color never --test-threads 2{skips}\n",
        exe.display()
    );
    let out = vm.run(qemu, &script, Duration::from_secs(900));
    assert!(out.contains("cgroup cgroup2fs: cpu memory pids"), "not a cgroup v2 VM with its controllers:\n{out}");
    assert!(out.contains("test result: ok.") && out.contains("BATON-VM-EXIT 0"), "in the cgroup v2 VM:\n{out}");
    Some(out)
}

/// Modules the initramfs loads, in dependency order, for virtio 9p,
/// overlayfs and a dummy network interface.
const MODULES: [&str; 12] = [
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "net/9p/9pnet",
    "net/9p/9pnet_virtio",
    "fs/netfs/netfs",
    "fs/fscache/fscache",
    "fs/9p/9p",
    "fs/overlayfs/overlay",
    "drivers/net/dummy",
];

/// PID 1 of the VM: mount the host's root read-only, give it fresh
/// /proc, /sys, cgroup2, /dev, and tmpfs on /run and /mnt, switch to it
/// and run the script named on the kernel command line (TMPDIR=/mnt),
/// then power off.
const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t devtmpfs dev /dev
for m in /modules/*.ko; do $B insmod "$m" || echo "insmod $m failed"; done
R=/newroot
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 host $R || echo "9p mount failed"
$B mount -t proc proc $R/proc
$B mount -t sysfs sys $R/sys
$B mount -t cgroup2 none $R/sys/fs/cgroup
$B mount -t devtmpfs dev $R/dev
$B mkdir -p $R/dev/pts
$B mount -t devpts devpts $R/dev/pts
$B mount -t tmpfs run $R/run
$B mount -t tmpfs scratch $R/mnt
run=$($B sed -n 's/.*baton\.run=\([^ ]*\).*/\1/p' /proc/cmdline)
$B umount /proc
exec $B switch_root $R /bin/busybox sh -c "TMPDIR=/mnt /bin/sh $run; echo BATON-VM-EXIT \$?; /bin/busybox poweroff -f"
"#;

struct Vm {
    /// In the target dir: the VM reads it through the host's root.
    dir: tempfile::TempDir,
    kernel: PathBuf,
}

impl Vm {
    fn new(kernel_dir: &Path) -> Vm {
        let find = |dir: PathBuf, prefix: &str| -> PathBuf {
            std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .flatten()
                .map(|e| e.path())
                .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
                .unwrap_or_else(|| panic!("no {prefix}* in {}", dir.display()))
        };
        let kernel = find(kernel_dir.join("boot"), "vmlinuz-");
        let modules = find(kernel_dir.join("lib/modules"), "").join("kernel");
        let dir = tempfile::Builder::new().prefix("baton-vm-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let root = dir.path().join("initramfs");
        let mut entries = vec!["bin".to_string(), "dev".into(), "proc".into(), "newroot".into(), "modules".into()];
        for d in &entries {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy(super::BUSYBOX, root.join("bin/busybox")).unwrap();
        entries.extend(["bin/busybox".into(), "init".into()]);
        // A module missing from the package is built into that kernel;
        // if it is not, the VM's own output says what failed to mount.
        for (i, m) in MODULES.iter().enumerate() {
            let from = modules.join(format!("{m}.ko"));
            let name = format!("modules/{i:02}-{}.ko", m.rsplit('/').next().unwrap_or(m));
            if from.exists() {
                std::fs::copy(&from, root.join(&name)).unwrap();
                entries.push(name);
            }
        }
        std::fs::write(root.join("init"), INIT).unwrap();
        std::fs::set_permissions(root.join("init"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        // An uncompressed newc archive, made by busybox's cpio.
        let cpio = std::fs::File::create(dir.path().join("initramfs.cpio")).unwrap();
        let mut child = Command::new(super::BUSYBOX)
            .args(["cpio", "-o", "-H", "newc"])
            .current_dir(&root)
            .stdin(Stdio::piped())
            .stdout(cpio)
            .stderr(Stdio::null())
            .spawn()
            .expect("busybox cpio");
        child.stdin.take().unwrap().write_all(entries.join("\n").as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "cpio failed");
        Vm { dir, kernel }
    }

    /// Boots, runs `script` as root in the VM, and returns the console.
    fn run(&self, qemu: &Path, script: &str, timeout: Duration) -> String {
        let script_path = self.dir.path().join("run.sh");
        std::fs::write(&script_path, script).unwrap();
        let console = self.dir.path().join("console.log");
        let stderr_path = self.dir.path().join("qemu.stderr");
        let mut child = Command::new(qemu)
            .args(["-accel", "tcg", "-m", "1024", "-smp", "2", "-display", "none", "-no-reboot", "-kernel"])
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(self.dir.path().join("initramfs.cpio"))
            .arg("-append")
            .arg(format!("console=ttyS0 quiet panic=-1 baton.run={}", script_path.display()))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .args(["-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap"])
            .args(["-nic", "none", "-monitor", "none"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("qemu-system-x86_64");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the VM did not power off within {timeout:?}:\n{}",
                    std::fs::read_to_string(&console).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let out = std::fs::read_to_string(&console).unwrap_or_default();
        assert!(status.success(), "qemu failed ({status}): {stderr}\n{out}");
        out
    }
}
