//! The agent binary's start-up errors, as an operator sees them.

use std::process::Command;

fn agent(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_baton-agent")).args(args).output().expect("run baton-agent");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_config_file_error_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "broker = \"mqtt://127.0.0.1\"\n\n[labels]\nsite = \"lyon\"\nheartbeat_interval_s = 3\n")
        .unwrap();
    let (ok, err) = agent(&["--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains(path.to_str().unwrap()), "{err}");
    assert!(err.contains("line 5"), "{err}");
    // A number where labels want strings: the field is named.
    assert!(err.contains("heartbeat_interval_s") || err.contains("labels"), "{err}");

    std::fs::write(&path, "keepalive_s = \"thirty\"\n").unwrap();
    let (ok, err) = agent(&["--config", path.to_str().unwrap()]);
    assert!(!ok && err.contains("line 1") && err.contains("keepalive_s"), "{err}");
}

#[test]
fn missing_explicit_config_and_bad_flags_are_clear() {
    let (ok, err) = agent(&["--config", "/nonexistent/agent.toml"]);
    assert!(!ok && err.contains("cannot read config file /nonexistent/agent.toml"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "").unwrap();
    let (ok, err) = agent(&["--config", path.to_str().unwrap(), "--device-id", "has space"]);
    assert!(!ok && err.contains("--device-id") && err.contains("invalid device id"), "{err}");
    let (ok, err) = agent(&["--config", path.to_str().unwrap(), "--broker", "http://x", "--device-id", "a"]);
    assert!(!ok && err.contains("--broker"), "{err}");
}
