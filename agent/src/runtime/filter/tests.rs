use super::*;

/// A classic BPF interpreter over `struct seccomp_data`, to read a
/// program's verdicts without loading it.
fn run(program: &[u8], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
    let mut data = Vec::with_capacity(64);
    data.extend_from_slice(&nr.to_ne_bytes());
    data.extend_from_slice(&arch.to_ne_bytes());
    data.extend_from_slice(&0u64.to_ne_bytes());
    for a in args {
        data.extend_from_slice(&a.to_ne_bytes());
    }
    let insns: Vec<(u16, u8, u8, u32)> = program
        .chunks_exact(8)
        .map(|c| (u16::from_ne_bytes([c[0], c[1]]), c[2], c[3], u32::from_ne_bytes([c[4], c[5], c[6], c[7]])))
        .collect();
    let (mut a, mut x, mut mem, mut pc) = (0u32, 0u32, [0u32; 16], 0usize);
    loop {
        let (code, jt, jf, k) = insns[pc];
        pc += 1;
        let src = if code & 0x08 != 0 { x } else { k };
        match code & 0x07 {
            0x00 => {
                // LD
                a = match code & 0xe0 {
                    0x20 => u32::from_ne_bytes(data[k as usize..k as usize + 4].try_into().expect("4 bytes")),
                    0x00 => k,
                    0x60 => mem[k as usize],
                    0x80 => 64,
                    other => panic!("ld mode {other:#x}"),
                }
            }
            0x01 => {
                x = match code & 0xe0 {
                    0x00 => k,
                    0x60 => mem[k as usize],
                    0x80 => 64,
                    other => panic!("ldx mode {other:#x}"),
                }
            }
            0x02 => mem[k as usize] = a,
            0x03 => mem[k as usize] = x,
            0x04 => {
                a = match code & 0xf0 {
                    0x00 => a.wrapping_add(src),
                    0x10 => a.wrapping_sub(src),
                    0x20 => a.wrapping_mul(src),
                    0x30 => a / src,
                    0x40 => a | src,
                    0x50 => a & src,
                    0x60 => a << src,
                    0x70 => a >> src,
                    0x80 => a.wrapping_neg(),
                    0x90 => a % src,
                    0xa0 => a ^ src,
                    other => panic!("alu op {other:#x}"),
                }
            }
            0x05 => {
                let taken = match code & 0xf0 {
                    0x00 => {
                        pc += k as usize;
                        continue;
                    }
                    0x10 => a == src,
                    0x20 => a > src,
                    0x30 => a >= src,
                    0x40 => a & src != 0,
                    other => panic!("jmp op {other:#x}"),
                };
                pc += if taken { jt } else { jf } as usize;
            }
            0x06 => return if code & 0x18 == 0x10 { a } else { k },
            0x07 => {
                if code & 0xf8 == 0x00 {
                    x = a
                } else {
                    a = x
                }
            }
            _ => unreachable!(),
        }
    }
}

const ALLOW: u32 = 0x7fff_0000;
const ERRNO: u32 = 0x0005_0000;
const X86_64: u32 = 0xc000_003e;
const I386: u32 = 0x4000_0003;
const AARCH64: u32 = 0xc000_00b7;
const X32_BIT: u32 = 0x4000_0000;

fn profile_for(caps: &[&str]) -> LinuxSeccomp {
    let caps: Vec<String> = caps.iter().map(|c| c.to_string()).collect();
    serde_json::from_value(super::super::seccomp::profile(&caps, std::env::consts::ARCH)).expect("profile")
}

/// Argument vectors that take each conditional rule of the profile both ways.
const ARGS: [[u64; 6]; 7] = [
    [0; 6],
    [0x1000_0000, 0, 0, 0, 0, 0], // CLONE_NEWUSER
    [0x0001_0011, 0, 0, 0, 0, 0], // CLONE_VM|CLONE_SIGHAND|SIGCHLD-like
    [40, 0, 0, 0, 0, 0],          // AF_VSOCK
    [2, 1, 0, 0, 0, 0],           // AF_INET, SOCK_STREAM / PER_LINUX32
    [8, 0, 0, 0, 0, 0],
    [0xffff_ffff, 0, 0, 0, 0, 0],
];

#[test]
#[cfg(target_arch = "x86_64")]
fn the_compiled_profile_says_what_the_profile_means() {
    let p = compile(&profile_for(&[])).expect("compile").0;
    let v = |nr, arch, args| run(&p, nr, arch, args);
    let eperm = ERRNO | libc::EPERM as u32;
    assert_eq!(v(0, X86_64, [0; 6]), ALLOW, "read");
    assert_eq!(v(165, X86_64, [0; 6]), eperm, "mount");
    assert_eq!(v(272, X86_64, [0; 6]), eperm, "unshare");
    assert_eq!(v(435, X86_64, [0; 6]), ERRNO | libc::ENOSYS as u32, "clone3");
    assert_eq!(v(56, X86_64, ARGS[2]), ALLOW, "clone for a thread");
    assert_eq!(v(56, X86_64, ARGS[1]), eperm, "clone into a new user namespace");
    assert_eq!(v(41, X86_64, ARGS[4]), ALLOW, "socket(AF_INET)");
    assert_eq!(v(41, X86_64, ARGS[3]), eperm, "socket(AF_VSOCK)");
    assert_eq!(v(135, X86_64, ARGS[5]), ALLOW, "personality(PER_LINUX32)");
    assert_eq!(v(135, X86_64, [1, 0, 0, 0, 0, 0]), eperm, "personality(1)");
    assert_eq!(v(1000, X86_64, [0; 6]), eperm, "no such syscall");
    assert_eq!(v(3, I386, [0; 6]), ALLOW, "i386 read");
    assert_eq!(v(21, I386, [0; 6]), eperm, "i386 mount");
    assert_eq!(v(X32_BIT, X86_64, [0; 6]), ALLOW, "x32 read");
    assert_eq!(v(X32_BIT | 165, X86_64, [0; 6]), eperm, "x32 mount");
    // An ABI the profile does not list is killed, whatever the syscall.
    assert_eq!(v(63, AARCH64, [0; 6]) & 0xffff_0000, 0, "aarch64 on an x86_64 filter");
    // With CAP_SYS_ADMIN, namespaces are the container's to make.
    let admin = compile(&profile_for(&["CAP_SYS_ADMIN"])).expect("compile").0;
    assert_eq!(run(&admin, 56, X86_64, ARGS[1]), ALLOW);
    assert_eq!(run(&admin, 165, X86_64, [0; 6]), ALLOW);
}

#[test]
fn a_cached_program_is_used_and_a_damaged_one_is_made_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = dir.path().join("bundle");
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&bundle).expect("bundle");
    assert_eq!(for_bundle(&bundle, false, &cache).expect("no profile"), None);
    let e = for_bundle(&bundle, true, &cache).expect_err("a named profile is missing");
    assert!(e.contains("seccomp.json"), "{e}");
    let json = serde_json::to_vec(&profile_for(&[])).expect("json");
    std::fs::write(bundle.join(PROFILE), &json).expect("profile");
    let first = for_bundle(&bundle, true, &cache).expect("compile").expect("a program");
    let cached: Vec<PathBuf> = std::fs::read_dir(&cache).expect("cache").map(|e| e.expect("entry").path()).collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let key = cached[0].file_stem().and_then(|s| s.to_str()).expect("key").to_string();
    assert_eq!(unframe(&key, &std::fs::read(&cached[0]).expect("read")), Some(first.clone()));

    // A cached program is taken as it is (a different one sealed under this
    // key shows that it was read, not compiled again)…
    let other = compile(&profile_for(&["CAP_SYS_ADMIN"])).expect("compile");
    std::fs::write(&cached[0], frame(&key, &other)).expect("write");
    assert_eq!(for_bundle(&bundle, true, &cache).expect("cached"), Some(other.clone()));
    // …unless it is damaged, or is another profile's entry copied under
    // this name: then it is compiled again and replaced.
    let mut bytes = frame(&key, &first);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&cached[0], &bytes).expect("write");
    assert_eq!(for_bundle(&bundle, true, &cache).expect("recompiled"), Some(first.clone()));
    std::fs::write(&cached[0], &frame(&key, &first)[..20]).expect("truncate");
    assert_eq!(for_bundle(&bundle, true, &cache).expect("recompiled"), Some(first.clone()));
    std::fs::write(&cached[0], frame("another profile's key", &other)).expect("write");
    assert_eq!(for_bundle(&bundle, true, &cache).expect("recompiled"), Some(first.clone()));
    assert_eq!(unframe(&key, &std::fs::read(&cached[0]).expect("read")), Some(first));

    // Another profile, another entry; a bad profile is an error, not an empty filter.
    std::fs::write(bundle.join(PROFILE), serde_json::to_vec(&profile_for(&["CAP_SYS_ADMIN"])).expect("json"))
        .expect("profile");
    for_bundle(&bundle, true, &cache).expect("compile");
    assert_eq!(std::fs::read_dir(&cache).expect("cache").count(), 2);
    std::fs::write(bundle.join(PROFILE), b"{\"defaultAction\": \"SCMP_ACT_NOPE\"}").expect("profile");
    let e = for_bundle(&bundle, true, &cache).expect_err("bad profile");
    assert!(e.contains("seccomp.json"), "{e}");
}

/// Helper process for `the_cached_program_is_the_one_libcontainer_loads`:
/// libcontainer loads the profile on this thread, which then waits to be read.
#[test]
#[ignore = "run by the_cached_program_is_the_one_libcontainer_loads"]
fn libcontainer_loads_the_profile_here() {
    let path = std::env::var("BATON_FILTER_PROFILE").expect("BATON_FILTER_PROFILE");
    let profile: LinuxSeccomp = serde_json::from_slice(&std::fs::read(path).expect("profile")).expect("json");
    // SAFETY: prctl with constant arguments on this thread.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }, 0);
    libcontainer::seccomp::initialize_seccomp(&profile).expect("libcontainer loads the profile");
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    let out = std::env::var("BATON_FILTER_TID").expect("BATON_FILTER_TID");
    std::fs::write(format!("{out}.new"), tid.to_string()).expect("write tid");
    std::fs::rename(format!("{out}.new"), out).expect("rename");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// The program the kernel holds for `tid` (`PTRACE_SECCOMP_GET_FILTER`, root only).
fn loaded_filter(tid: i32) -> Vec<u8> {
    const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
    // SAFETY: ptrace requests on a thread of a child we started; buffers sized from the kernel's answer.
    unsafe {
        assert_eq!(libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0), 0, "seize: {}", std::io::Error::last_os_error());
        assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0), 0);
        let mut status = 0;
        assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid);
        let n = libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, 0, std::ptr::null_mut::<libc::c_void>());
        assert!(n > 0, "PTRACE_SECCOMP_GET_FILTER: {}", std::io::Error::last_os_error());
        let mut buf = vec![0u8; n as usize * INSN];
        let got = libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, 0, buf.as_mut_ptr());
        assert_eq!(got, n);
        // Let go, or the helper could not be reaped once killed.
        assert_eq!(libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0), 0);
        buf
    }
}

/// The cached program and the filter libcontainer itself loads for the same
/// profile, read back from the kernel: the same verdict for every syscall
/// number on every ABI the profile lists, under every argument vector that
/// takes its conditional rules both ways — and the same instructions.
#[test]
fn the_cached_program_is_the_one_libcontainer_loads() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: reading a loaded seccomp filter back needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for caps in [&[][..], &["CAP_SYS_ADMIN"][..], &["CAP_SYS_TIME", "CAP_SYS_PTRACE", "CAP_SYS_MODULE"][..]] {
        let profile = profile_for(caps);
        let path = dir.path().join("profile.json");
        std::fs::write(&path, serde_json::to_vec(&profile).expect("json")).expect("write");
        let tid_file = dir.path().join("tid");
        let _ = std::fs::remove_file(&tid_file);
        let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["runtime::filter::tests::libcontainer_loads_the_profile_here", "--exact", "--ignored"])
            .args(["--test-threads=1"])
            .env("BATON_FILTER_PROFILE", &path)
            .env("BATON_FILTER_TID", &tid_file)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("helper");
        // The helper says which thread holds the filter.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let tid: i32 = loop {
            if let Some(tid) = std::fs::read_to_string(&tid_file).ok().and_then(|t| t.trim().parse().ok()) {
                break tid;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the helper ended ({status}) before loading the filter");
            }
            assert!(std::time::Instant::now() < deadline, "the helper did not load the filter in 30 s");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let theirs = loaded_filter(tid);
        let _ = child.kill();
        let _ = child.wait();

        let ours = compile(&profile).expect("compile");
        let abis: Vec<(u32, u32)> = match std::env::consts::ARCH {
            "x86_64" => vec![(X86_64, 0), (I386, 0), (X86_64, X32_BIT)],
            "aarch64" => vec![(AARCH64, 0), (0x4000_0028, 0)],
            _ => vec![(0x4000_0028, 0)],
        };
        let mut compared = 0;
        for (arch, base) in abis {
            for nr in 0..1024 {
                for args in ARGS {
                    let (a, b) = (run(ours.bytes(), base | nr, arch, args), run(&theirs, base | nr, arch, args));
                    assert_eq!(a, b, "{caps:?}: syscall {nr} on ABI {arch:#x}/{base:#x} with {args:?}");
                    compared += 1;
                }
            }
        }
        assert!(compared >= 2 * 1024 * ARGS.len());
        assert_eq!(ours.bytes(), &theirs[..], "{caps:?}: not the same instructions");
    }
}
