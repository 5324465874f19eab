//! Seccomp filters compiled once per profile, not once per start.
//!
//! libcontainer turns a bundle's `linux.seccomp` into a BPF program with
//! libseccomp inside every container init and every exec: resolving ~400
//! names for three ABIs and generating the program took about 7 ms of a
//! 20 ms start. The agent instead writes the profile beside the bundle's
//! `config.json` (as `seccomp.json`, out of libcontainer's sight); the shim
//! and the exec helper look it up in a cache on tmpfs keyed by the profile's
//! bytes, the kernel and the architecture, compile it with the same
//! libseccomp calls libcontainer makes only on a miss, and hand the program
//! to [`Filtered`], the executor that loads it in the container process
//! right before `execve` — where libcontainer loads its own (after
//! `no_new_privileges`, after the capabilities are dropped).
//!
//! A cached file carries a magic and the SHA-256 of its key and program
//! together: a damaged one, or one copied under another profile's name, is
//! compiled again, never loaded. The cache lives on tmpfs, so a new kernel
//! (a reboot) starts it empty.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use libcontainer::oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use libseccomp::{ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
use sha2::{Digest, Sha256};

/// The profile file beside `config.json`.
pub const PROFILE: &str = "seccomp.json";
const MAGIC: &[u8; 8] = b"BATONBPF";
/// The kernel refuses longer classic BPF programs.
const MAX_INSNS: usize = 4096;
const INSN: usize = 8;

/// A compiled seccomp program: classic BPF instructions, native byte order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program(Vec<u8>);

impl Program {
    fn checked(bytes: Vec<u8>) -> Result<Self, String> {
        let n = bytes.len() / INSN;
        if bytes.is_empty() || bytes.len() % INSN != 0 || n > MAX_INSNS {
            return Err(format!("a seccomp program of {} bytes is not 1-{MAX_INSNS} instructions", bytes.len()));
        }
        Ok(Self(bytes))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn instructions(&self) -> usize {
        self.0.len() / INSN
    }

    /// Loads the program on the calling thread (`seccomp(2)`, no flags: what
    /// libseccomp's `seccomp_load` does for a profile without flags). The
    /// thread must have `no_new_privs` set or hold `CAP_SYS_ADMIN`.
    pub fn install(&self) -> std::io::Result<()> {
        let prog =
            libc::sock_fprog { len: self.instructions() as u16, filter: self.0.as_ptr() as *mut libc::sock_filter };
        // SAFETY: `prog` points at `len` whole sock_filter records (checked
        // when made) that outlive the call; the kernel copies them.
        let r = unsafe {
            libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog as *const libc::sock_fprog)
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// The annotation in `config.json` that says the bundle has a profile: a
/// bundle that names one and lacks it does not run unfiltered.
pub const ANNOTATION: &str = "org.baton.seccomp";

/// Whether a bundle's `config.json` names a profile beside it.
pub fn named_in(config: &serde_json::Value) -> bool {
    config["annotations"][ANNOTATION].as_str() == Some(PROFILE)
}

/// The program for the profile in `bundle`, if the bundle has one (it must
/// when `named`): from the cache in `cache`, else compiled (and kept there).
pub fn for_bundle(bundle: &Path, named: bool, cache: &Path) -> Result<Option<Program>, String> {
    let profile = match std::fs::read(bundle.join(PROFILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => return Ok(None),
        Err(e) => return Err(format!("cannot read {PROFILE}: {e}")),
    };
    let key = key(&profile);
    let path = cache.join(format!("{key}.bpf"));
    if let Some(program) = std::fs::read(&path).ok().and_then(|b| unframe(&key, &b)) {
        return Ok(Some(program));
    }
    let program = compile_json(&profile)?;
    // A cache that cannot be written costs the next start a compile, nothing else.
    let _ = store(cache, &path, &frame(&key, &program));
    Ok(Some(program))
}

/// Writes a cache entry whole or not at all. Shims starting side by side
/// may compile one profile at once: each writes its own temp file (tmpfs:
/// no fsync), and the last rename wins with the same bytes.
fn store(cache: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(cache)?;
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The cache key: the profile's bytes, the kernel, the architecture and the
/// libseccomp the program was made with.
fn key(profile: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(profile);
    h.update([0]);
    h.update(std::fs::read("/proc/sys/kernel/osrelease").unwrap_or_default());
    h.update(std::env::consts::ARCH);
    if let Ok(v) = libseccomp::ScmpVersion::current() {
        h.update(format!("{}.{}.{}", v.major, v.minor, v.micro));
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The seal of a cache entry: its key and its program hashed together, so
/// that an entry copied under another profile's name is not taken for it.
fn seal(key: &str, program: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update([0]);
    h.update(program);
    h.finalize().into()
}

fn frame(key: &str, program: &Program) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&seal(key, program.bytes()));
    out.extend_from_slice(program.bytes());
    out
}

fn unframe(key: &str, bytes: &[u8]) -> Option<Program> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let (digest, program) = rest.split_at_checked(32)?;
    (seal(key, program) == digest).then(|| Program::checked(program.to_vec()).ok())?
}

/// Compiles an OCI `linux.seccomp` value (JSON).
pub fn compile_json(profile: &[u8]) -> Result<Program, String> {
    let profile: LinuxSeccomp =
        serde_json::from_slice(profile).map_err(|e| format!("{PROFILE} is not an OCI seccomp profile: {e}"))?;
    compile(&profile)
}

/// Compiles a profile with the libseccomp calls libcontainer 0.7 makes for
/// it (`libcontainer::seccomp::initialize_seccomp`), exporting the program
/// instead of loading it. Profiles that need a notify socket or filter flags
/// are refused: the agent writes neither.
pub fn compile(profile: &LinuxSeccomp) -> Result<Program, String> {
    fn err(what: &str) -> impl FnOnce(libseccomp::error::SeccompError) -> String + '_ {
        move |e| format!("seccomp: {what}: {e}")
    }
    if profile.flags().as_ref().is_some_and(|f| !f.is_empty()) {
        let flags: Vec<&LinuxSeccompFilterFlag> = profile.flags().iter().flatten().collect();
        return Err(format!("seccomp: filter flags {flags:?} are not supported"));
    }
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut ctx = ScmpFilterContext::new(default).map_err(err("new filter"))?;
    for &a in profile.architectures().iter().flatten() {
        ctx.add_arch(arch(a)?).map_err(err("add architecture"))?;
    }
    ctx.set_ctl_nnp(false).map_err(err("no_new_privs attribute"))?;
    for rule in profile.syscalls().iter().flatten() {
        let act = action(rule.action(), rule.errno_ret())?;
        if act == default {
            continue; // redundant, and libseccomp refuses it
        }
        for name in rule.names() {
            // A name this libseccomp does not know gets the default action.
            let Ok(nr) = ScmpSyscall::from_name(name) else { continue };
            let Some(args) = rule.args() else {
                ctx.add_rule(act, nr).map_err(err(name))?;
                continue;
            };
            let cmps: Vec<ScmpArgCompare> = args
                .iter()
                .map(|a| ScmpArgCompare::new(a.index() as u32, op(a.op(), a.value_two()), a.value()))
                .collect();
            let mut indexes: Vec<u32> = args.iter().map(|a| a.index() as u32).collect();
            indexes.sort_unstable();
            indexes.dedup();
            if indexes.len() == cmps.len() {
                ctx.add_rule_conditional(act, nr, &cmps).map_err(err(name))?;
            } else {
                // One argument compared twice: one rule per comparison (as runc).
                for c in &cmps {
                    ctx.add_rule_conditional(act, nr, std::slice::from_ref(c)).map_err(err(name))?;
                }
            }
        }
    }
    export(&ctx)
}

fn export(ctx: &ScmpFilterContext) -> Result<Program, String> {
    use std::io::{Read, Seek};
    // SAFETY: memfd_create with a static NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"baton-seccomp".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("seccomp: memfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    ctx.export_bpf(&file).map_err(|e| format!("seccomp: export: {e}"))?;
    let mut bytes = Vec::new();
    file.rewind().and_then(|()| file.read_to_end(&mut bytes)).map_err(|e| format!("seccomp: export: {e}"))?;
    Program::checked(bytes)
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction, String> {
    let errno = errno.map_or(libc::EPERM, |e| e as i32);
    Ok(match a {
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActErrno => ScmpAction::Errno(errno),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => ScmpAction::KillThread,
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        other => return Err(format!("seccomp: action {other:?} is not supported")),
    })
}

fn op(o: LinuxSeccompOperator, two: Option<u64>) -> ScmpCompareOp {
    match o {
        LinuxSeccompOperator::ScmpCmpNe => ScmpCompareOp::NotEqual,
        LinuxSeccompOperator::ScmpCmpLt => ScmpCompareOp::Less,
        LinuxSeccompOperator::ScmpCmpLe => ScmpCompareOp::LessOrEqual,
        LinuxSeccompOperator::ScmpCmpEq => ScmpCompareOp::Equal,
        LinuxSeccompOperator::ScmpCmpGe => ScmpCompareOp::GreaterEqual,
        LinuxSeccompOperator::ScmpCmpGt => ScmpCompareOp::Greater,
        LinuxSeccompOperator::ScmpCmpMaskedEq => ScmpCompareOp::MaskedEqual(two.unwrap_or(0)),
    }
}

fn arch(a: Arch) -> Result<ScmpArch, String> {
    Ok(match a {
        Arch::ScmpArchNative => ScmpArch::Native,
        Arch::ScmpArchX86 => ScmpArch::X86,
        Arch::ScmpArchX86_64 => ScmpArch::X8664,
        Arch::ScmpArchX32 => ScmpArch::X32,
        Arch::ScmpArchArm => ScmpArch::Arm,
        Arch::ScmpArchAarch64 => ScmpArch::Aarch64,
        Arch::ScmpArchRiscv64 => ScmpArch::Riscv64,
        other => return Err(format!("seccomp: architecture {other:?} is not supported")),
    })
}

/// libcontainer's default executor (`PATH` lookup, `execvp`), with the
/// container's seccomp program loaded just before the `execve`.
#[derive(Clone)]
pub struct Filtered(pub Option<Program>);

impl Executor for Filtered {
    fn exec(&self, spec: &libcontainer::oci_spec::runtime::Spec) -> Result<(), ExecutorError> {
        default_signals();
        if let Some(program) = &self.0 {
            program.install().map_err(|e| ExecutorError::Other(format!("cannot load the seccomp filter: {e}")))?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &libcontainer::oci_spec::runtime::Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

/// The container's process starts with every signal at its default, as
/// under Docker: ignored dispositions survive exec, and the agent's (Rust
/// ignores SIGPIPE; `nohup` adds SIGHUP) would otherwise reach the workload
/// — `yes | head -1` would not end on SIGPIPE. Runs in the container's
/// process, just before its exec.
/// Through the system call, not libc's `signal`: glibc refuses to touch
/// the two real-time signals it keeps for itself (32, 33), which can be
/// inherited ignored too.
fn default_signals() {
    // The kernel's sigaction, all zero: SIG_DFL, no flags, nothing masked
    // (the same layout on every Linux architecture for this value).
    let default = [0u64; 4];
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: rt_sigaction reads `default` (large enough for the
            // kernel's struct) and writes nothing back (old = null); this
            // process is about to exec, so no handler of ours is needed.
            unsafe { libc::syscall(libc::SYS_rt_sigaction, sig, default.as_ptr(), std::ptr::null_mut::<u8>(), 8usize) };
        }
    }
}

/// Where the shim and the exec helper keep compiled programs: beside
/// libcontainer's state root, on the same tmpfs.
pub fn cache_beside(youki_root: &Path) -> PathBuf {
    youki_root.with_file_name("seccomp")
}

#[cfg(test)]
mod tests;
