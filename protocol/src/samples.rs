//! One realistic message of every kind. Fixtures, tests and the size benchmark
//! use them; keep them stable: the committed fixtures are their encodings.

use crate::message::*;
use crate::spec::*;

pub fn presence() -> Presence {
    Presence {
        state: PresenceState::Online,
        agent_version: "0.1.0".into(),
        boot_id: "0b7f3c1e-6a58-4c8e-9d55-2f0a7e6d9b41".into(),
        started_at: 1_795_000_000,
    }
}

pub fn inventory() -> Inventory {
    Inventory {
        agent_version: "0.1.0".into(),
        arch: "aarch64".into(),
        arch_variant: String::new(),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        kernel: "6.6.31+rpt-rpi-v8".into(),
        hostname: "pi-kitchen".into(),
        cpus: 4,
        memory_bytes: 4_124_000_000,
        disk_bytes: 31_000_000_000,
        cgroup: CgroupVersion::V2,
        labels: vec![("site".into(), "lyon".into()), ("role".into(), "sensor".into())],
        addresses: vec!["192.0.2.17".into()],
        sealing_key: crate::crypto::DeviceKey::from_seed(&[1; 32]).public().to_vec(),
        // Since 1.6.
        previous_agent_version: "0.0.9".into(),
        upgrade: Some(crate::release::UpgradeOutcome {
            version: "0.1.1".into(),
            rollout: 3,
            state: crate::release::UpgradeState::RolledBack,
            detail: "the new agent did not come online within 120 s".into(),
        }),
        // Since 1.10.
        heartbeat_interval_s: 300,
        no_workloads: false,
    }
}

pub fn heartbeat() -> Heartbeat {
    Heartbeat {
        seq: 1234,
        uptime_s: 86_400,
        load1_centi: 37,
        mem_used_kib: 412_000,
        mem_total_kib: 3_900_000,
        disk_free_mib: 21_000,
        temp_milli_c: Some(48_312),
        applied_generation: 17,
        unix_ms: 1_795_000_000_000,
        // Since 1.8.
        loads: vec![WorkloadLoad {
            workload: "web".into(),
            cpu_milli: Some(350),
            memory_bytes: 24 << 20,
            load_milli: Some(12_500),
            load_error: None,
        }],
    }
}

pub fn report() -> Report {
    Report {
        generation: 17,
        workloads: vec![WorkloadStatus {
            name: "sensor-reader".into(),
            revision: 4,
            phase: Phase::Running,
            health: Health::Healthy,
            restarts: 1,
            last_exit_code: Some(137),
            last_error: Some("OOM-killed".into()),
            cpu_usage_ns: 12_000_000_000,
            memory_bytes: 3_200_000,
        }],
        refused: None,
        // Since 1.7.
        addresses: vec![("sensor-reader".into(), "10.47.0.2".into())],
        // Since 1.8.
        waiting: vec![Waiting {
            workload: "sensor-reader".into(),
            revision: 4,
            reason: "outside its install window (0 2 * * * for 2h Europe/Paris)".into(),
            until_ms: 1_795_050_000_000,
        }],
    }
}

pub fn desired() -> Desired {
    Desired {
        generation: 17,
        workloads: vec![WorkloadSpec {
            name: "sensor-reader".into(),
            revision: 4,
            image: "registry.local:5000/sensor:1.4".into(),
            image_digest: "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae".into(),
            health_deadline_s: 120,
            container: ContainerSpec {
                command: vec!["/bin/sensor".into()],
                args: vec!["--bus".into(), "1".into()],
                env: vec![("LOG".into(), "info".into())],
                working_dir: Some("/data".into()),
                user: Some(User { uid: 1000, gid: 1000 }),
                hostname: None,
                resources: Resources {
                    memory_bytes: Some(64 << 20),
                    cpu_millis: Some(500),
                    cpu_shares: None,
                    pids: Some(64),
                },
                restart: RestartPolicy::Always,
                backoff_cap_s: 300,
                mounts: vec![
                    Mount {
                        target: "/data".into(),
                        source: MountSource::Volume("sensor-data".into()),
                        read_only: false,
                    },
                    Mount { target: "/tmp".into(), source: MountSource::Tmpfs(8 << 20), read_only: false },
                ],
                devices: vec![DeviceMount {
                    host_path: "/dev/i2c-1".into(),
                    container_path: String::new(),
                    permissions: "rw".into(),
                }],
                network: NetworkMode::Bridge,
                ports: vec![Port { name: "metrics".into(), port: 9100, protocol: PortProtocol::Tcp }],
                read_only_rootfs: true,
                security: Security::default(),
                liveness: Some(Probe {
                    check: ProbeCheck::Http { port: 9100, path: "/healthz".into() },
                    interval_s: 10,
                    timeout_s: 2,
                    failure_threshold: 3,
                    initial_delay_s: 5,
                }),
                readiness: None,
                files: vec![
                    File { path: "/etc/sensor.toml".into(), mode: 0o444, contents: b"rate = 10\n".to_vec() },
                    // Since 1.2. A fixed stand-in: real seals use a fresh ephemeral key.
                    File {
                        path: "/run/secrets/token".into(),
                        mode: File::SEALED | 0o400,
                        contents: (0u8..55).collect(),
                    },
                ],
                // Since 1.5 (extensions).
                user_name: Some("sensor:i2c".into()),
                allow_privilege_escalation: true,
                // Since 1.7 (extensions).
                publish: vec![Publish { host_port: 9100, port: 9100, protocol: PortProtocol::Tcp }],
                bandwidth: Bandwidth { egress_bps: 2_000_000, ingress_bps: 0 },
                allow_from: Some(vec!["dashboard".into()]),
            },
        }],
        services: vec![ServiceEndpoints {
            name: "broker".into(),
            consumers: vec!["sensor-reader".into()],
            endpoints: vec![Endpoint {
                device: "pi-gateway".into(),
                address: "192.168.1.20".into(),
                port_name: "mqtt".into(),
                port: 1884,
            }],
        }],
        issued_ms: 1_795_000_000_000,
        // Since 1.6.
        agent: Some(crate::release::AgentTarget {
            version: "0.1.1".into(),
            digest: (0u8..32).collect(),
            size: 5_300_000,
            rollout: 3,
            downgrade: false,
        }),
        // Since 1.7.
        service_ports: vec![ServicePort {
            service: "broker".into(),
            name: "mqtt".into(),
            port: 1883,
            protocol: PortProtocol::Tcp,
        }],
        // Since 1.8.
        load_reports: vec!["sensor-reader".into()],
        updates: vec![UpdatePolicy {
            workload: "sensor-reader".into(),
            install: Some(Windows {
                text: "0 2 * * * for 2h Europe/Paris".into(),
                from_ms: 1_794_960_000_000,
                until_ms: 1_796_169_600_000,
                spans: vec![(1_794_963_600_000, 1_794_970_800_000), (1_795_050_000_000, 1_795_057_200_000)],
            }),
            download: None,
            max_delay_s: 7 * 86_400,
            lock: Some(UpdateLock { max_s: 3600, override_after_max: true }),
        }],
    }
}

/// `desired()` signed for device `pi-kitchen` by the key with seed `[7; 32]`
/// (Ed25519 signatures are deterministic, so the fixture is stable).
pub fn signed_desired() -> SignedDesired {
    let document = crate::codec::encode(&Message::Desired(desired())).expect("the sample encodes");
    crate::crypto::SigningKey::from_seed(&[7; 32]).sign_desired("pi-kitchen", document)
}

pub fn command() -> Command {
    let unsigned = Command {
        id: 99,
        deadline_ms: 1_795_000_030_000,
        action: CommandAction::Logs { workload: "sensor-reader".into(), tail: 100, follow: true },
        key: Vec::new(),
        signature: Vec::new(),
        issued_ms: 1_795_000_000_000,
        time_signature: Vec::new(),
    };
    crate::crypto::SigningKey::from_seed(&[7; 32]).sign_command("pi-kitchen", unsigned)
}

pub fn command_result() -> CommandResult {
    CommandResult { id: 99, seq: 0, body: CommandOutput::Stdout(b"2026-11-27T09:00:00Z reading=21.5\n".to_vec()) }
}

/// One sample of every message kind, in `MessageKind::ALL` order.
pub fn all() -> Vec<Message> {
    vec![
        Message::Presence(presence()),
        Message::Inventory(inventory()),
        Message::Heartbeat(heartbeat()),
        Message::Report(report()),
        Message::Desired(desired()),
        Message::Command(command()),
        Message::CommandResult(command_result()),
        Message::SignedDesired(signed_desired()),
        Message::EnrollRequest(EnrollRequest {
            token_id: "3f9c2a7d1b6e4f08".into(),
            token_secret: "9d".repeat(32),
            sealing_key: crate::crypto::DeviceKey::from_seed(&[1; 32]).public().to_vec(),
        }),
        Message::EnrollResponse(EnrollResponse { sealed_password: (0u8..112).collect(), error: None }),
        Message::ReleaseRequest(crate::release::ReleaseRequest {
            digest: (0u8..32).collect(),
            offset: 3 * 65_536,
            len: crate::release::CHUNK_BYTES,
        }),
        Message::ReleaseChunk(crate::release::ReleaseChunk {
            digest: (0u8..32).collect(),
            offset: 3 * 65_536,
            total: 5_300_000,
            data: (0..200u8).collect(),
            error: None,
        }),
    ]
}
