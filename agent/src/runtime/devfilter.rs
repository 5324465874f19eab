//! Device rules on cgroup v2 (Raspberry Pi OS). cgroup v1 has a `devices`
//! controller that libcontainer writes the rules to; v2 has none: the kernel
//! asks an eBPF program attached to the container's cgroup. libcontainer
//! builds that program only with a feature that links libbpf (C, libelf,
//! zlib: too much for a small static agent), and without it the rules are
//! silently ignored, so the shim attaches its own: a handful of
//! instructions, loaded and attached with two `bpf(2)` calls.
//!
//! `rules` and `program` are pure (the program is checked by a small
//! interpreter in the tests); `attach` makes the syscalls.

use std::path::Path;

use serde_json::Value;

/// `bpf_cgroup_dev_ctx.access_type`: the device type in the low 16 bits…
const DEV_BLOCK: u32 = 1;
const DEV_CHAR: u32 = 2;
/// …the access asked for in the high 16 bits.
const ACC_MKNOD: u32 = 1;
const ACC_READ: u32 = 2;
const ACC_WRITE: u32 = 4;
const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

/// One OCI device rule; `None` matches any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    /// `DEV_CHAR` or `DEV_BLOCK`.
    pub kind: Option<u32>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// `ACC_*` bits.
    pub access: u32,
}

fn access_bits(access: &str) -> u32 {
    access.chars().fold(0, |bits, c| {
        bits | match c {
            'r' => ACC_READ,
            'w' => ACC_WRITE,
            'm' => ACC_MKNOD,
            _ => 0,
        }
    })
}

fn rule(allow: bool, kind: Option<u32>, major: Option<u32>, minor: Option<u32>, access: &str) -> Rule {
    Rule { allow, kind, major, minor, access: access_bits(access) }
}

/// The container's rules (`linux.resources.devices` of its config), then
/// what libcontainer adds to them on cgroup v1 (any node may be created,
/// console, ptys, tun), so both versions allow the same.
pub fn rules(config: &Value) -> Vec<Rule> {
    let mut out: Vec<Rule> = config["linux"]["resources"]["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let kind = match d["type"].as_str() {
                Some("c") => Some(DEV_CHAR),
                Some("b") => Some(DEV_BLOCK),
                _ => None,
            };
            let num = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
            rule(
                d["allow"].as_bool().unwrap_or(false),
                kind,
                num(&d["major"]),
                num(&d["minor"]),
                d["access"].as_str().unwrap_or("rwm"),
            )
        })
        .collect();
    out.extend([
        rule(true, Some(DEV_CHAR), None, None, "m"),
        rule(true, Some(DEV_BLOCK), None, None, "m"),
        rule(true, Some(DEV_CHAR), Some(5), Some(1), "rwm"),
        rule(true, Some(DEV_CHAR), Some(136), None, "rwm"),
        rule(true, Some(DEV_CHAR), Some(5), Some(2), "rwm"),
        rule(true, Some(DEV_CHAR), Some(10), Some(200), "rwm"),
    ]);
    out
}

/// An eBPF instruction: opcode, registers (dst low nibble, src high), offset, immediate.
pub type Insn = [u8; 8];

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    let o = off.to_le_bytes();
    let i = imm.to_le_bytes();
    [code, dst | (src << 4), o[0], o[1], i[0], i[1], i[2], i[3]]
}

const LDX_W: u8 = 0x61; // dst = *(u32 *)(src + off)
const AND_K: u8 = 0x54; // dst &= imm (32-bit)
const RSH_K: u8 = 0x74; // dst >>= imm (32-bit)
const MOV_K: u8 = 0xb4; // dst = imm (32-bit)
const MOV_X: u8 = 0xbc; // dst = src (32-bit)
const JNE_K: u8 = 0x55; // if dst != imm: pc += off
const EXIT: u8 = 0x95;

/// The program: the last rule that matches a request decides (rules are
/// checked from the end); none matching denies. A rule matches when its type,
/// major and minor match (or are wildcards) and the access asked for is
/// within the rule's.
pub fn program(rules: &[Rule]) -> Vec<Insn> {
    // r2 = type, r3 = access, r4 = major, r5 = minor (r1 is the context, then scratch).
    let mut p =
        vec![insn(LDX_W, 2, 1, 0, 0), insn(AND_K, 2, 0, 0, 0xffff), insn(LDX_W, 3, 1, 0, 0), insn(RSH_K, 3, 0, 0, 16)];
    p.push(insn(LDX_W, 4, 1, 4, 0));
    p.push(insn(LDX_W, 5, 1, 8, 0));
    for r in rules.iter().rev() {
        let mut checks: Vec<(u8, Option<Insn>, i32)> = Vec::new(); // (register compared, set-up insn, value)
        if let Some(kind) = r.kind {
            checks.push((2, None, kind as i32));
        }
        if r.access & ACC_ALL != ACC_ALL {
            // r1 = access asked & !allowed: anything left means the rule does not cover it.
            checks.push((1, Some(insn(MOV_X, 1, 3, 0, 0)), 0));
        }
        if let Some(major) = r.major {
            checks.push((4, None, major as i32));
        }
        if let Some(minor) = r.minor {
            checks.push((5, None, minor as i32));
        }
        // Each check jumps past the rest of this rule's block when it fails.
        let block_len: usize =
            checks.iter().map(|(_, setup, _)| 1 + usize::from(setup.is_some()) * 2).sum::<usize>() + 2;
        let unconditional = checks.is_empty();
        let mut emitted = 0;
        for (reg, setup, value) in checks {
            if let Some(s) = setup {
                p.push(s);
                p.push(insn(AND_K, 1, 0, 0, !(r.access as i32) & 0xffff));
                emitted += 2;
            }
            emitted += 1;
            p.push(insn(JNE_K, reg, 0, (block_len - emitted) as i16, value));
        }
        p.push(insn(MOV_K, 0, 0, 0, i32::from(r.allow)));
        p.push(insn(EXIT, 0, 0, 0, 0));
        // A rule matching everything ends the program: the verifier refuses unreachable code.
        if unconditional {
            return p;
        }
    }
    p.push(insn(MOV_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// Whether `/sys/fs/cgroup` is the unified (v2) hierarchy.
pub fn cgroup_v2() -> bool {
    nix::sys::statfs::statfs("/sys/fs/cgroup")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

fn bpf(cmd: libc::c_int, attr: &mut [u8]) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-filled `union bpf_attr` prefix of the size given,
    // laid out as the command expects; the kernel reads at most that many bytes.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Loads `prog` as a cgroup device program and attaches it to the cgroup
/// directory `cgroup` (cgroup v2), alongside any already there.
pub fn attach(cgroup: &Path, prog: &[Insn]) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const BPF_PROG_LOAD: libc::c_int = 5;
    const BPF_PROG_ATTACH: libc::c_int = 8;
    const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
    const BPF_CGROUP_DEVICE: u32 = 6;
    const BPF_F_ALLOW_MULTI: u32 = 2;
    // Kernels before 5.11 charge BPF programs to RLIMIT_MEMLOCK (the shim's
    // own limit; the container's is set by its spec).
    let _ = nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_MEMLOCK,
        nix::sys::resource::RLIM_INFINITY,
        nix::sys::resource::RLIM_INFINITY,
    );
    let code: Vec<u8> = prog.iter().flatten().copied().collect();
    let license = b"Apache-2.0\0";
    let mut load = [0u8; 72];
    load[0..4].copy_from_slice(&BPF_PROG_TYPE_CGROUP_DEVICE.to_ne_bytes());
    load[4..8].copy_from_slice(&(prog.len() as u32).to_ne_bytes());
    load[8..16].copy_from_slice(&(code.as_ptr() as u64).to_ne_bytes());
    load[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_PROG_LOAD, &mut load)?;
    // SAFETY: a successful BPF_PROG_LOAD returns a new file descriptor we own.
    let prog_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let dir = std::fs::File::open(cgroup)?;
    let mut attach = [0u8; 20];
    attach[0..4].copy_from_slice(&(dir.as_raw_fd() as u32).to_ne_bytes());
    attach[4..8].copy_from_slice(&(prog_fd.as_raw_fd() as u32).to_ne_bytes());
    attach[8..12].copy_from_slice(&BPF_CGROUP_DEVICE.to_ne_bytes());
    attach[12..16].copy_from_slice(&BPF_F_ALLOW_MULTI.to_ne_bytes());
    bpf(BPF_PROG_ATTACH, &mut attach)?;
    // The attachment holds the program; our descriptors can go.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Runs the instructions `program` emits on a request, as the kernel would.
    fn run(prog: &[Insn], kind: u32, major: u32, minor: u32, access: u32) -> u32 {
        let ctx = [kind | (access << 16), major, minor];
        let mut r = [0u32; 6];
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            let (dst, src) = ((i[1] & 0xf) as usize, (i[1] >> 4) as usize);
            let off = i16::from_le_bytes([i[2], i[3]]);
            let imm = i32::from_le_bytes([i[4], i[5], i[6], i[7]]) as u32;
            pc += 1;
            match i[0] {
                LDX_W => r[dst] = ctx[off as usize / 4],
                AND_K => r[dst] &= imm,
                RSH_K => r[dst] >>= imm,
                MOV_K => r[dst] = imm,
                MOV_X => r[dst] = r[src],
                JNE_K if r[dst] != imm => pc = (pc as isize + off as isize) as usize,
                JNE_K => {}
                EXIT => return r[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    /// Every instruction can run (the kernel's verifier refuses a program with dead code).
    fn assert_all_reachable(prog: &[Insn]) {
        let mut seen = vec![false; prog.len()];
        let mut todo = vec![0usize];
        while let Some(pc) = todo.pop() {
            if pc >= prog.len() || std::mem::replace(&mut seen[pc], true) {
                continue;
            }
            match prog[pc][0] {
                EXIT => {}
                JNE_K => {
                    let off = i16::from_le_bytes([prog[pc][2], prog[pc][3]]);
                    todo.push(pc + 1);
                    todo.push((pc as isize + 1 + off as isize) as usize);
                }
                _ => todo.push(pc + 1),
            }
        }
        assert!(seen.iter().all(|s| *s), "unreachable instructions: {seen:?}");
    }

    /// The rules' meaning, said plainly: the last matching rule decides.
    fn decide(rules: &[Rule], kind: u32, major: u32, minor: u32, access: u32) -> u32 {
        rules
            .iter()
            .rev()
            .find(|r| {
                r.kind.is_none_or(|k| k == kind)
                    && r.major.is_none_or(|m| m == major)
                    && r.minor.is_none_or(|m| m == minor)
                    && access & !r.access == 0
            })
            .map_or(0, |r| u32::from(r.allow))
    }

    fn config(devices: Value) -> Value {
        json!({"linux": {"resources": {"devices": devices}}})
    }

    #[test]
    fn the_program_decides_as_the_rules_say() {
        let cfg = config(json!([
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
            {"allow": true, "type": "c", "major": 188, "minor": 0, "access": "r"},
            {"allow": true, "type": "c", "major": 136, "access": "rwm"},
            {"allow": false, "type": "c", "major": 136, "minor": 7, "access": "w"},
        ]));
        let rules = rules(&cfg);
        let prog = program(&rules);
        assert_all_reachable(&prog);
        let mut checked = 0;
        for kind in [DEV_CHAR, DEV_BLOCK] {
            for (major, minor) in [(1, 3), (1, 1), (188, 0), (136, 7), (136, 1), (5, 1), (10, 200), (8, 0)] {
                for access in 1..=ACC_ALL {
                    assert_eq!(
                        run(&prog, kind, major, minor, access),
                        decide(&rules, kind, major, minor, access),
                        "type {kind} {major}:{minor} access {access:#b}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 2 * 8 * 7);
        // Spot checks of what matters: /dev/null yes, /dev/mem no, the sensor read-only,
        // any node may be created (as on cgroup v1), a block disk is not readable.
        assert_eq!(run(&prog, DEV_CHAR, 1, 3, ACC_READ | ACC_WRITE), 1);
        assert_eq!(run(&prog, DEV_CHAR, 1, 1, ACC_READ), 0);
        assert_eq!(run(&prog, DEV_CHAR, 188, 0, ACC_READ), 1);
        assert_eq!(run(&prog, DEV_CHAR, 188, 0, ACC_WRITE), 0);
        assert_eq!(run(&prog, DEV_BLOCK, 8, 0, ACC_MKNOD), 1);
        assert_eq!(run(&prog, DEV_BLOCK, 8, 0, ACC_READ), 0);
    }

    #[test]
    fn a_privileged_container_allows_everything() {
        let prog = program(&rules(&config(json!([{"allow": true, "access": "rwm"}]))));
        assert_all_reachable(&prog);
        assert_eq!(run(&prog, DEV_BLOCK, 8, 0, ACC_ALL), 1);
        // No rules at all: only what libcontainer always allows.
        let prog = program(&rules(&json!({})));
        assert_all_reachable(&prog);
        assert_eq!(run(&prog, DEV_CHAR, 1, 3, ACC_READ), 0);
        assert_eq!(run(&prog, DEV_CHAR, 5, 2, ACC_READ), 1);
    }
}
