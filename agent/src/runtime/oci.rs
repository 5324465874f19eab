//! A Baton `ContainerSpec` → an OCI runtime `config.json`.
//!
//! `validate` and `config_json` are pure; `resolve_devices` and `check_host`
//! look at the host (device nodes, bind sources) so a bad spec is refused
//! before anything is created. Hardening is on by default: Docker's default
//! capability set, no_new_privileges, masked and read-only /proc paths, a
//! device allowlist, Docker's default seccomp profile (`super::seccomp`).
//! `privileged` turns all of it off; `seccomp_unconfined` only the seccomp part.
//!
//! One file although long (a third is tests): it is one transformation,
//! spec → config.json, with the host checks that refuse what it cannot express.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use baton_protocol::spec::{ContainerSpec, MountSource, NetworkMode, ProbeCheck};
use serde_json::{json, Value};

use super::layout::Layout;

/// Docker's default capability set.
pub const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

const MASKED_PATHS: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];

const READONLY_PATHS: [&str; 5] = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

const MIN_MEMORY: u64 = 4 << 20;

pub(crate) const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A host device node to pass through, as found on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedDevice {
    pub container_path: String,
    /// `c` or `b`.
    pub kind: &'static str,
    pub major: u64,
    pub minor: u64,
    pub file_mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub access: String,
}

/// Config files travel inside desired documents: keep them small.
pub const MAX_FILES_BYTES: usize = 128 * 1024;

fn is_clean_absolute(p: &str) -> bool {
    p.starts_with('/') && !p.split('/').any(|c| c == "..") && !p.contains('\0')
}

fn valid_volume_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && !n.starts_with(['.', '-'])
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Checks what can be checked without looking at the host; errors name the field.
pub fn validate(spec: &ContainerSpec) -> Result<(), String> {
    if spec.command.is_empty() && spec.args.is_empty() {
        return Err("command: nothing to run (set command or args)".into());
    }
    for (i, a) in spec.command.iter().chain(&spec.args).enumerate() {
        if a.contains('\0') {
            return Err(format!("command/args[{i}]: contains a NUL byte"));
        }
    }
    let sec = &spec.security;
    if let Some((field, _, c)) = baton_protocol::spec::unknown_capability(&sec.cap_add, &sec.cap_drop) {
        return Err(format!("{field}: {c:?} is not a Linux capability"));
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(format!("env: invalid variable name {k:?}"));
        }
    }
    if let Some(dir) = &spec.working_dir {
        if !is_clean_absolute(dir) {
            return Err(format!("working_dir: {dir:?} must be an absolute path without '..'"));
        }
    }
    let r = &spec.resources;
    if let Some(m) = r.memory_bytes {
        if m < MIN_MEMORY {
            return Err(format!("resources.memory: {m} bytes is below the 4 MiB minimum"));
        }
    }
    if let Some(c) = r.cpu_millis {
        if c == 0 || c > 1024 * 1000 {
            return Err(format!("resources.cpu: {c} millicpus is out of range (1-1024000)"));
        }
    }
    if let Some(s) = r.cpu_shares {
        if !(2..=262_144).contains(&s) {
            return Err(format!("resources.cpu_shares: {s} is out of range (2-262144)"));
        }
    }
    if r.pids == Some(0) {
        return Err("resources.pids: must be at least 1".into());
    }
    for (i, m) in spec.mounts.iter().enumerate() {
        if !is_clean_absolute(&m.target) || m.target == "/" {
            return Err(format!(
                "mounts[{i}].target: {:?} must be an absolute path other than /, without '..'",
                m.target
            ));
        }
        match &m.source {
            MountSource::Volume(name) if !valid_volume_name(name) => {
                return Err(format!("mounts[{i}].volume: {name:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"));
            }
            MountSource::Bind(src) if !is_clean_absolute(src) => {
                return Err(format!("mounts[{i}].bind: {src:?} must be an absolute path without '..'"));
            }
            MountSource::Tmpfs(0) => return Err(format!("mounts[{i}].tmpfs: size must be at least 1 byte")),
            _ => {}
        }
    }
    for (i, d) in spec.devices.iter().enumerate() {
        if !is_clean_absolute(&d.host_path) || !d.host_path.starts_with("/dev/") {
            return Err(format!("devices[{i}]: {:?} must be a path under /dev/", d.host_path));
        }
        if !d.container_path.is_empty() && !is_clean_absolute(&d.container_path) {
            return Err(format!("devices[{i}].container_path: {:?} must be absolute", d.container_path));
        }
        if d.permissions.is_empty() || !d.permissions.chars().all(|c| "rwm".contains(c)) {
            return Err(format!("devices[{i}].permissions: {:?} must be a non-empty subset of rwm", d.permissions));
        }
    }
    for (field, probe) in [("liveness", &spec.liveness), ("readiness", &spec.readiness)] {
        let Some(p) = probe else { continue };
        if p.interval_s == 0 || p.timeout_s == 0 || p.failure_threshold == 0 {
            return Err(format!("{field}: interval, timeout and failure threshold must be at least 1"));
        }
        match &p.check {
            ProbeCheck::Exec(argv) if argv.is_empty() => return Err(format!("{field}.exec: empty command")),
            ProbeCheck::Tcp { .. } | ProbeCheck::Http { .. } if spec.network == NetworkMode::None => {
                return Err(format!(
                    "{field}: tcp and http probes reach the container from the host and need host networking; with network: none use an exec probe"
                ));
            }
            ProbeCheck::Http { path, .. } if !path.starts_with('/') || path.contains(char::is_whitespace) => {
                return Err(format!("{field}.http.path: {path:?} must start with / and contain no spaces"));
            }
            _ => {}
        }
    }
    let mut total = 0usize;
    for (i, f) in spec.files.iter().enumerate() {
        if !is_clean_absolute(&f.path) || f.path.ends_with('/') || f.path == "/" {
            return Err(format!("files[{i}].path: {:?} must be an absolute file path without '..'", f.path));
        }
        if spec.files[..i].iter().any(|o| o.path == f.path) {
            return Err(format!("files[{i}].path: {:?} appears twice", f.path));
        }
        if f.mode > 0o7777 {
            return Err(format!("files[{i}].mode: {:o} is not a permission mode", f.mode));
        }
        total += f.contents.len();
    }
    if total > MAX_FILES_BYTES {
        return Err(format!("files: {total} bytes in all, more than the {MAX_FILES_BYTES}-byte limit"));
    }
    Ok(())
}

/// Looks up each passed-through device node on this host.
pub fn resolve_devices(spec: &ContainerSpec) -> Result<Vec<ResolvedDevice>, String> {
    spec.devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let meta = std::fs::metadata(&d.host_path)
                .map_err(|e| format!("devices[{i}]: {} does not exist on this device ({e})", d.host_path))?;
            let kind = if meta.file_type().is_char_device() {
                "c"
            } else if meta.file_type().is_block_device() {
                "b"
            } else {
                return Err(format!("devices[{i}]: {} is not a device node", d.host_path));
            };
            let rdev = meta.rdev();
            Ok(ResolvedDevice {
                container_path: if d.container_path.is_empty() {
                    d.host_path.clone()
                } else {
                    d.container_path.clone()
                },
                kind,
                major: libc::major(rdev) as u64,
                minor: libc::minor(rdev) as u64,
                file_mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                access: d.permissions.clone(),
            })
        })
        .collect()
}

/// Checks bind-mount sources exist (volumes are created on demand).
pub fn check_host(spec: &ContainerSpec) -> Result<(), String> {
    for (i, m) in spec.mounts.iter().enumerate() {
        if let MountSource::Bind(src) = &m.source {
            if !Path::new(src).exists() {
                return Err(format!("mounts[{i}].bind: {src} does not exist on this device"));
            }
        }
    }
    Ok(())
}

/// The OCI runtime config for `spec`. Pure.
pub fn config_json(
    id: &str,
    spec: &ContainerSpec,
    rootfs: &Path,
    layout: &Layout,
    devices: &[ResolvedDevice],
) -> Value {
    let privileged = spec.security.privileged;
    let mut args: Vec<&str> = spec.command.iter().chain(&spec.args).map(String::as_str).collect();
    if args.is_empty() {
        args.push("/bin/sh");
    }
    let mut env = vec![DEFAULT_PATH.to_string()];
    for (k, v) in &spec.env {
        env.retain(|e| !e.starts_with(&format!("{k}=")));
        env.push(format!("{k}={v}"));
    }
    let caps: Vec<String> = if privileged {
        all_capabilities()
    } else {
        let mut caps: Vec<String> = DEFAULT_CAPS.iter().map(|c| c.to_string()).collect();
        let norm = |c: &String| baton_protocol::spec::capability(c).unwrap_or_else(|| c.to_uppercase());
        let drop: Vec<String> = spec.security.cap_drop.iter().map(norm).collect();
        caps.retain(|c| !drop.contains(c) && !drop.iter().any(|d| d == "ALL"));
        let add: Vec<String> = spec.security.cap_add.iter().map(norm).collect();
        let add = if add.iter().any(|c| c == "ALL") { all_capabilities() } else { add };
        for c in add {
            if !caps.contains(&c) {
                caps.push(c);
            }
        }
        caps
    };
    let user = spec.user.unwrap_or_default();

    let mut namespaces =
        vec![json!({"type": "pid"}), json!({"type": "ipc"}), json!({"type": "uts"}), json!({"type": "mount"})];
    // Bridge: the runtime gives it the path of the namespace `net` made.
    if matches!(spec.network, NetworkMode::None | NetworkMode::Bridge) {
        namespaces.push(json!({"type": "network"}));
    }

    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    for m in &spec.mounts {
        let rw = if m.read_only { "ro" } else { "rw" };
        mounts.push(match &m.source {
            MountSource::Volume(name) => json!({
                "destination": m.target, "type": "bind", "source": layout.volume(name),
                "options": ["rbind", rw, "nosuid", "nodev"],
            }),
            MountSource::Bind(src) => json!({
                "destination": m.target, "type": "bind", "source": src, "options": ["rbind", rw],
            }),
            MountSource::Tmpfs(size) => json!({
                "destination": m.target, "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "nodev", rw, format!("size={size}"), "mode=1777"],
            }),
        });
    }

    for (i, f) in spec.files.iter().enumerate() {
        mounts.push(json!({
            "destination": f.path, "type": "bind", "source": layout.container_files(id).join(i.to_string()),
            "options": ["bind", "ro", "nosuid", "nodev"],
        }));
    }

    // Deny every device, then allow the ones every container needs, then the passthrough.
    let mut device_rules = if privileged {
        vec![json!({"allow": true, "access": "rwm"})]
    } else {
        let mut rules = vec![json!({"allow": false, "access": "rwm"})];
        for (major, minor) in [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2)] {
            rules.push(json!({"allow": true, "type": "c", "major": major, "minor": minor, "access": "rwm"}));
        }
        rules.push(json!({"allow": true, "type": "c", "major": 136, "access": "rwm"}));
        rules
    };
    let mut linux_devices = Vec::new();
    for d in devices {
        device_rules
            .push(json!({"allow": true, "type": d.kind, "major": d.major, "minor": d.minor, "access": d.access}));
        linux_devices.push(json!({
            "path": d.container_path, "type": d.kind, "major": d.major, "minor": d.minor,
            "fileMode": d.file_mode, "uid": d.uid, "gid": d.gid,
        }));
    }

    let mut resources = json!({"devices": device_rules});
    let r = &spec.resources;
    if let Some(limit) = r.memory_bytes {
        resources["memory"] = json!({"limit": limit});
    }
    if r.cpu_millis.is_some() || r.cpu_shares.is_some() {
        let mut cpu = json!({});
        if let Some(m) = r.cpu_millis {
            cpu["quota"] = json!(i64::from(m) * 100);
            cpu["period"] = json!(100_000);
        }
        if let Some(s) = r.cpu_shares {
            cpu["shares"] = json!(s);
        }
        resources["cpu"] = cpu;
    }
    if let Some(p) = r.pids {
        resources["pids"] = json!({"limit": p});
    }

    let seccomp = if privileged || spec.security.seccomp_unconfined {
        Value::Null
    } else {
        super::seccomp::profile(&caps, std::env::consts::ARCH)
    };

    let mut config = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": user.uid, "gid": user.gid},
            "args": args,
            "env": env,
            "cwd": spec.working_dir.as_deref().unwrap_or("/"),
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": true,
        },
        "root": {"path": rootfs, "readonly": spec.read_only_rootfs},
        "hostname": spec.hostname.as_deref().unwrap_or(id),
        "mounts": mounts,
        "linux": {
            "cgroupsPath": layout.cgroup(id),
            "namespaces": namespaces,
            "resources": resources,
            "devices": linux_devices,
            "maskedPaths": if privileged { vec![] } else { MASKED_PATHS.to_vec() },
            "readonlyPaths": if privileged { vec![] } else { READONLY_PATHS.to_vec() },
            "seccomp": seccomp,
        },
    });
    // Escalation allowed: the key is left out rather than false (as runc
    // reads a bundle, that is "leave the bit alone"). Such a container has
    // no seccomp filter: the agent loads filters after the switch to the
    // container's user, where the kernel refuses one without
    // no_new_privileges, so escalation needs `seccomp_unconfined`.
    if privileged || spec.allow_privilege_escalation {
        if let Some(p) = config["process"].as_object_mut() {
            p.remove("noNewPrivileges");
        }
    }
    config
}

fn all_capabilities() -> Vec<String> {
    baton_protocol::spec::CAPABILITIES.iter().map(|c| format!("CAP_{c}")).collect()
}

/// Keeps a container's capabilities within `held` (the agent's own bounding
/// set): `privileged` and `cap_add: [ALL]` mean "all the device can give",
/// as Docker and Podman read them; a capability named in `cap_add` that the
/// device cannot give refuses the start, naming it.
pub fn fit_capabilities(
    config: &mut Value,
    security: &baton_protocol::spec::Security,
    held: &[String],
) -> Result<(), String> {
    if !security.privileged {
        for c in &security.cap_add {
            match baton_protocol::spec::capability(c) {
                Some(cap) if cap != "ALL" && !held.contains(&cap) => {
                    return Err(format!(
                        "cap_add {c}: this device cannot give it (its agent's bounding set lacks {cap})"
                    ));
                }
                _ => {}
            }
        }
    }
    if let Some(sets) = config["process"]["capabilities"].as_object_mut() {
        for set in sets.values_mut() {
            if let Some(list) = set.as_array_mut() {
                list.retain(|c| c.as_str().is_some_and(|c| held.iter().any(|h| h == c)));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_protocol::spec::*;

    fn spec() -> ContainerSpec {
        ContainerSpec { command: vec!["/bin/sh".into(), "-c".into(), "true".into()], ..Default::default() }
    }

    fn parse(v: &Value) -> libcontainer::oci_spec::runtime::Spec {
        serde_json::from_value(v.clone()).expect("a valid OCI runtime spec")
    }

    #[test]
    fn default_spec_is_hardened_and_valid_oci() {
        let layout = Layout::new("/data", "/run/baton");
        let v = config_json("web", &spec(), Path::new("/rootfs"), &layout, &[]);
        let oci = parse(&v);
        let process = oci.process().as_ref().unwrap();
        assert_eq!(process.no_new_privileges(), Some(true));
        // Escalation allowed: unset (not false), with the seccomp filter kept.
        let open = ContainerSpec { allow_privilege_escalation: true, ..spec() };
        let o = parse(&config_json("web", &open, Path::new("/rootfs"), &layout, &[]));
        assert_eq!(o.process().as_ref().unwrap().no_new_privileges(), None);
        assert!(o.linux().as_ref().unwrap().seccomp().is_some());
        let caps = process.capabilities().as_ref().unwrap().bounding().as_ref().unwrap();
        assert_eq!(caps.len(), DEFAULT_CAPS.len());
        assert_eq!(v["linux"]["cgroupsPath"], "/baton/web");
        assert_eq!(v["linux"]["maskedPaths"].as_array().unwrap().len(), MASKED_PATHS.len());
        assert_eq!(v["linux"]["resources"]["devices"][0], json!({"allow": false, "access": "rwm"}));
        // Host network by default: no network namespace.
        assert!(!v["linux"]["namespaces"].as_array().unwrap().contains(&json!({"type": "network"})));
        assert_eq!(v["hostname"], "web");
        let allowed = v["linux"]["seccomp"]["syscalls"][0]["names"].as_array().unwrap();
        assert_eq!(v["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        assert!(allowed.contains(&json!("read")) && !allowed.contains(&json!("unshare")));
    }

    #[test]
    fn seccomp_follows_capabilities_and_opt_outs() {
        let layout = Layout::new("/data", "/run/baton");
        let mut s = spec();
        s.security.cap_add = vec!["SYS_TIME".into()];
        let v = config_json("t", &s, Path::new("/r"), &layout, &[]);
        let allowed = v["linux"]["seccomp"]["syscalls"][0]["names"].as_array().unwrap();
        assert!(allowed.contains(&json!("settimeofday")) && !allowed.contains(&json!("mount")));
        s.security.seccomp_unconfined = true;
        assert!(config_json("t", &s, Path::new("/r"), &layout, &[])["linux"]["seccomp"].is_null());
        let privileged = ContainerSpec { security: Security { privileged: true, ..Default::default() }, ..spec() };
        let v = config_json("t", &privileged, Path::new("/r"), &layout, &[]);
        parse(&v);
        assert!(v["linux"]["seccomp"].is_null() && v["linux"]["maskedPaths"].as_array().unwrap().is_empty());
    }

    #[test]
    fn limits_mounts_devices_and_network_translate() {
        let mut s = spec();
        s.resources =
            Resources { memory_bytes: Some(64 << 20), cpu_millis: Some(500), cpu_shares: Some(512), pids: Some(32) };
        s.network = NetworkMode::None;
        s.read_only_rootfs = true;
        s.env = vec![("PATH".into(), "/bin".into()), ("A".into(), "1".into())];
        s.mounts = vec![
            Mount { target: "/data".into(), source: MountSource::Volume("db".into()), read_only: false },
            Mount { target: "/tmp".into(), source: MountSource::Tmpfs(1 << 20), read_only: false },
        ];
        s.security.cap_drop = vec!["net_raw".into()];
        s.security.cap_add = vec!["SYS_TIME".into()];
        let dev = ResolvedDevice {
            container_path: "/dev/ttyUSB0".into(),
            kind: "c",
            major: 188,
            minor: 0,
            file_mode: 0o660,
            uid: 0,
            gid: 20,
            access: "rw".into(),
        };
        let layout = Layout::new("/data", "/run/baton");
        let v = config_json("db", &s, Path::new("/rootfs"), &layout, &[dev]);
        parse(&v);
        let r = &v["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], 64 << 20);
        assert_eq!((r["cpu"]["quota"].as_i64(), r["cpu"]["shares"].as_i64()), (Some(50_000), Some(512)));
        assert_eq!(r["pids"]["limit"], 32);
        assert!(r["devices"]
            .as_array()
            .unwrap()
            .contains(&json!({"allow": true, "type": "c", "major": 188, "minor": 0, "access": "rw"})));
        assert!(v["linux"]["namespaces"].as_array().unwrap().contains(&json!({"type": "network"})));
        assert_eq!(v["root"]["readonly"], true);
        assert_eq!(v["process"]["env"], json!(["PATH=/bin", "A=1"]));
        let mounts = v["mounts"].as_array().unwrap();
        assert!(mounts.iter().any(|m| m["destination"] == "/data" && m["source"] == "/data/volumes/db"));
        let caps = v["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(caps.contains(&json!("CAP_SYS_TIME")) && !caps.contains(&json!("CAP_NET_RAW")));
    }

    #[test]
    fn bad_specs_are_refused_naming_the_field() {
        let cases: Vec<(ContainerSpec, &str)> = vec![
            (ContainerSpec::default(), "command"),
            (
                ContainerSpec { resources: Resources { memory_bytes: Some(1000), ..Default::default() }, ..spec() },
                "resources.memory",
            ),
            (
                ContainerSpec { resources: Resources { pids: Some(0), ..Default::default() }, ..spec() },
                "resources.pids",
            ),
            (
                ContainerSpec { resources: Resources { cpu_millis: Some(0), ..Default::default() }, ..spec() },
                "resources.cpu",
            ),
            (
                ContainerSpec {
                    mounts: vec![Mount { target: "/x/../etc".into(), source: MountSource::Tmpfs(1), read_only: false }],
                    ..spec()
                },
                "mounts[0].target",
            ),
            (
                ContainerSpec {
                    mounts: vec![Mount {
                        target: "/x".into(),
                        source: MountSource::Volume("../up".into()),
                        read_only: false,
                    }],
                    ..spec()
                },
                "mounts[0].volume",
            ),
            (
                ContainerSpec {
                    devices: vec![DeviceMount {
                        host_path: "/etc/passwd".into(),
                        container_path: String::new(),
                        permissions: "rw".into(),
                    }],
                    ..spec()
                },
                "devices[0]",
            ),
            (ContainerSpec { env: vec![("A=B".into(), "x".into())], ..spec() }, "env"),
        ];
        for (s, field) in cases {
            let e = validate(&s).unwrap_err();
            assert!(e.starts_with(field), "{field}: {e}");
        }
        let missing = ContainerSpec {
            devices: vec![DeviceMount {
                host_path: "/dev/baton-nope".into(),
                container_path: String::new(),
                permissions: "rw".into(),
            }],
            ..spec()
        };
        assert!(resolve_devices(&missing).unwrap_err().contains("does not exist"));
        let null = ContainerSpec {
            devices: vec![DeviceMount {
                host_path: "/dev/null".into(),
                container_path: "/dev/mynull".into(),
                permissions: "rw".into(),
            }],
            ..spec()
        };
        let d = resolve_devices(&null).unwrap();
        assert_eq!((d[0].kind, d[0].major, d[0].minor), ("c", 1, 3));
    }

    #[test]
    fn capabilities_stay_within_what_the_device_holds() {
        let layout = Layout::new("/data", "/run/baton");
        let held: Vec<String> = baton_protocol::spec::CAPABILITIES
            .iter()
            .filter(|c| **c != "SYS_RESOURCE")
            .map(|c| format!("CAP_{c}"))
            .collect();
        let caps = |v: &Value| v["process"]["capabilities"]["permitted"].as_array().unwrap().clone();
        // Privileged and cap_add: [ALL]: everything the device holds, nothing more.
        let mut s = spec();
        s.security.privileged = true;
        let mut v = config_json("p", &s, Path::new("/r"), &layout, &[]);
        assert!(caps(&v).contains(&json!("CAP_SYS_RESOURCE")));
        fit_capabilities(&mut v, &s.security, &held).unwrap();
        assert_eq!(caps(&v).len(), held.len());
        assert!(!caps(&v).contains(&json!("CAP_SYS_RESOURCE")));
        let mut s = spec();
        s.security.cap_add = vec!["all".into()];
        let mut v = config_json("p", &s, Path::new("/r"), &layout, &[]);
        fit_capabilities(&mut v, &s.security, &held).unwrap();
        assert_eq!(caps(&v).len(), held.len());
        // Named in cap_add but not held: refused, naming it.
        s.security.cap_add = vec!["sys_time".into(), "SYS_RESOURCE".into()];
        let mut v = config_json("p", &s, Path::new("/r"), &layout, &[]);
        let e = fit_capabilities(&mut v, &s.security, &held).unwrap_err();
        assert!(e.contains("SYS_RESOURCE") && !e.contains("SYS_TIME"), "{e}");
        // Names Linux does not have are refused before anything is made.
        s.security.cap_add = vec!["BOGUS".into()];
        assert!(validate(&s).unwrap_err().contains("BOGUS"));
        assert_eq!(baton_protocol::spec::capability("cap_net_admin").as_deref(), Some("CAP_NET_ADMIN"));
        assert_eq!(baton_protocol::spec::capability(" All ").as_deref(), Some("ALL"));
        assert_eq!(baton_protocol::spec::capability("CAP_"), None);
    }

    /// The `regex` libcontainer and oci-spec call is regex-lite here (the
    /// workspace's patch): their patterns must still compile and decide.
    #[test]
    fn the_patterns_of_oci_spec_decide_the_same_under_regex_lite() {
        use libcontainer::oci_spec::distribution::Reference;
        use libcontainer::oci_spec::runtime::Process;
        let digest = format!("sha256:{}", "a1".repeat(32));
        for (text, registry, repository, tag) in [
            ("busybox", "docker.io", "library/busybox", Some("latest")),
            ("ghcr.io/org/app:v1.2_rc-3", "ghcr.io", "org/app", Some("v1.2_rc-3")),
            ("localhost:5000/a/b/c:1", "localhost:5000", "a/b/c", Some("1")),
        ] {
            let r = Reference::try_from(text).expect(text);
            assert_eq!((r.registry(), r.repository(), r.tag()), (registry, repository, tag), "{text}");
        }
        let pinned = Reference::try_from(format!("registry.example:443/app@{digest}").as_str()).expect("a digest");
        assert_eq!(pinned.digest(), Some(digest.as_str()));
        for bad in ["app/UPPER", "app:", "app@sha256:xyz", "a//b", "app:tag with space", "app:\u{e9}t\u{e9}"] {
            assert!(Reference::try_from(bad).is_err(), "{bad} was accepted");
        }
        let affinity = |v: &str| {
            let p = serde_json::json!({"cwd": "/", "user": {"uid": 0, "gid": 0}, "execCPUAffinity": {"initial": v}});
            serde_json::from_value::<Process>(p)
        };
        for ok in ["0", "0-3,7", "1,2,3", "0-1,4-5"] {
            if let Err(e) = affinity(ok) {
                panic!("{ok} refused: {e}");
            }
        }
        for bad in ["", "x", "0-", ",1", "1,,2", "0 -3"] {
            let refused = affinity(bad).expect_err(bad).to_string();
            assert!(refused.contains("execCPUAffinity"), "{bad:?}: {refused}");
        }
    }
}
