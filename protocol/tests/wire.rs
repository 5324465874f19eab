//! The wire contract as bytes: committed fixtures every later version must still
//! read, and property tests that decoding never panics.
//!
//! `BATON_BLESS=1 cargo test -p baton-protocol --test wire` rewrites the
//! fixtures of the *current* version only; older versions' fixtures are frozen.

use std::path::PathBuf;

use baton_protocol::{decode, encode, samples, MessageKind, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use proptest::prelude::*;

fn fixture_dir(major: u8, minor: u8) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/v{major}.{minor}"))
}

#[test]
fn current_encoding_matches_committed_fixtures() {
    let dir = fixture_dir(PROTOCOL_MAJOR, PROTOCOL_MINOR);
    let bless = std::env::var_os("BATON_BLESS").is_some();
    for msg in samples::all() {
        let path = dir.join(format!("{}.bin", msg.kind().name()));
        let bytes = encode(&msg).unwrap();
        if bless {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(bytes, committed, "{} changed on the wire; that needs a version bump", path.display());
    }
}

#[test]
fn every_committed_fixture_of_every_version_still_decodes() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut seen = 0;
    for version in std::fs::read_dir(&root).unwrap() {
        let version = version.unwrap().path();
        let minor: u8 = version.to_string_lossy().rsplit('.').next().and_then(|m| m.parse().ok()).unwrap();
        for kind in MessageKind::ALL {
            if kind.since_minor() > minor {
                continue;
            }
            let path = version.join(format!("{}.bin", kind.name()));
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let (env, msg) = decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(env.kind, kind);
            // Fields a later minor appended read as defaults, so each fixture must
            // decode to today's sample with those fields at their defaults.
            let sample = samples::all().into_iter().find(|m| m.kind() == kind).unwrap();
            assert_eq!(msg, as_of_minor(sample, minor), "{}", path.display());
            seen += 1;
        }
    }
    assert!(seen >= MessageKind::ALL.len(), "no fixtures found under {}", root.display());
}

/// A message as a peer of `minor` sends it: the fields later minors appended at defaults.
fn as_of_minor(msg: baton_protocol::Message, minor: u8) -> baton_protocol::Message {
    use baton_protocol::{Command, Message};
    match msg {
        Message::Desired(mut d) => {
            // 1.8 appended the workloads whose load heartbeats carry.
            if minor < 8 {
                d.load_reports.clear();
                d.updates.clear();
            }
            // 1.7's extensions: bridge networking (the 1.4 layout says `None`
            // for it; the sample was on the host's network before).
            if minor < 7 {
                d.service_ports.clear();
                for w in &mut d.workloads {
                    w.container.network = baton_protocol::spec::NetworkMode::Host;
                    w.container.publish.clear();
                    w.container.bandwidth = Default::default();
                    w.container.allow_from = None;
                }
            }
            // 1.6 appended `agent`.
            if minor < 6 {
                d.agent = None;
            }
            // 1.5 appended extensions: the container fields they carry.
            if minor < 5 {
                for w in &mut d.workloads {
                    w.container.user_name = None;
                    w.container.allow_privilege_escalation = false;
                }
            }
            // 1.4 appended `issued_ms`.
            if minor < 4 {
                d.issued_ms = 0;
            }
            // 1.1 appended `services`.
            if minor < 1 {
                d.services.clear();
            }
            // 1.2 gave file modes a sealed flag; the sample gained a sealed file.
            if minor < 2 {
                for w in &mut d.workloads {
                    w.container.files.retain(|f| !f.is_sealed());
                }
            }
            Message::Desired(d)
        }
        // 1.7 appended the bridged containers' addresses, 1.8 what waits.
        Message::Report(mut r) if minor < 8 => {
            r.waiting.clear();
            if minor < 7 {
                r.addresses.clear();
            }
            Message::Report(r)
        }
        // 1.4 appended the clocks: the device's in heartbeats, the controller's
        // in documents and commands; 1.8 the workloads' loads.
        Message::Heartbeat(mut h) if minor < 8 => {
            h.loads.clear();
            if minor < 4 {
                h.unix_ms = 0;
            }
            Message::Heartbeat(h)
        }
        // 1.2 appended `sealing_key`, 1.6 the agent's previous version and
        // last upgrade, 1.10 its heartbeat interval and whether it runs workloads.
        Message::Inventory(mut i) if minor < 10 => {
            i.heartbeat_interval_s = 0;
            i.no_workloads = false;
            if minor < 6 {
                if minor < 2 {
                    i.sealing_key.clear();
                }
                i.previous_agent_version.clear();
                i.upgrade = None;
            }
            Message::Inventory(i)
        }
        // The signed document inside carries its sender's version in its
        // envelope (the signature covers it).
        Message::SignedDesired(_) if minor < PROTOCOL_MINOR => {
            let Message::Desired(d) = as_of_minor(Message::Desired(samples::desired()), minor) else {
                unreachable!("a desired document stays one")
            };
            let mut document = encode(&Message::Desired(d)).expect("encodes");
            // What 1.6 appended (no agent: a zero byte), 1.5 (no extensions: a zero byte) and 1.4
            // (`issued_ms`, a zero byte at its default) is not in older bytes.
            // 1.7 appended service ports, 1.8 load reports and update
            // policies (none: a zero byte each).
            if minor < 8 {
                document.pop();
                document.pop();
            }
            if minor < 7 {
                document.pop();
            }
            if minor < 6 {
                document.pop();
            }
            if minor < 5 {
                document.pop();
            }
            if minor < 4 {
                document.pop();
            }
            document[1] = minor;
            let key = baton_protocol::crypto::SigningKey::from_seed(&[7; 32]);
            Message::SignedDesired(key.sign_desired("pi-kitchen", document))
        }
        // 1.3 appended the signature, 1.4 the controller's time and its signature.
        Message::Command(mut c) if minor < 4 => {
            c.issued_ms = 0;
            c.time_signature.clear();
            let c = if minor < 3 {
                Command { key: Vec::new(), signature: Vec::new(), ..c }
            } else {
                // The 1.3 fixture was signed without a time: its signature is the same.
                c
            };
            Message::Command(c)
        }
        other => other,
    }
}

#[test]
fn heartbeat_fits_in_64_bytes() {
    // An ordinary heartbeat: no autoscaled workload on the device.
    let plain = baton_protocol::Heartbeat { loads: Vec::new(), ..samples::heartbeat() };
    let bytes = encode(&baton_protocol::Message::Heartbeat(plain)).unwrap();
    assert!(bytes.len() <= 64, "heartbeat is {} bytes", bytes.len());
    // Each autoscaled workload adds its name and about a dozen bytes.
    let bytes = encode(&baton_protocol::Message::Heartbeat(samples::heartbeat())).unwrap();
    assert!(bytes.len() <= 64 + 24, "heartbeat with one load is {} bytes", bytes.len());
}

/// Built once: the samples include a signature and key derivations, slow in debug builds.
fn samples() -> &'static [baton_protocol::Message] {
    static SAMPLES: std::sync::OnceLock<Vec<baton_protocol::Message>> = std::sync::OnceLock::new();
    SAMPLES.get_or_init(samples::all)
}

fn valid_encodings() -> Vec<Vec<u8>> {
    samples().iter().map(|m| encode(m).expect("samples encode")).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn decoding_random_bodies_behind_a_valid_header_never_panics(
        kind in 1u8..=12,
        minor in 0u8..=PROTOCOL_MINOR,
        body in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let mut bytes = vec![PROTOCOL_MAJOR, minor, kind];
        bytes.extend(body);
        let _ = decode(&bytes);
    }

    #[test]
    fn decoding_mutated_messages_never_panics(
        which in 0usize..12,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let mut bytes = valid_encodings().swap_remove(which);
        for (at, byte, op) in edits {
            if bytes.is_empty() { break; }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => { bytes.truncate(i); }
                _ => bytes.insert(i, byte),
            }
        }
        if let Ok((_, msg)) = decode(&bytes) {
            // Whatever decoded is a real value: it re-encodes and decodes to itself.
            if let Ok(again) = encode(&msg) {
                prop_assert_eq!(decode(&again).map(|(_, m)| m), Ok(msg));
            }
        }
    }

    #[test]
    fn samples_round_trip(which in 0usize..12) {
        let msg = samples()[which].clone();
        let (_, back) = decode(&encode(&msg).unwrap()).unwrap();
        prop_assert_eq!(back, msg);
    }
}
