//! The `baton` binary's start-up errors, as an operator sees them.

use std::process::Command;

fn baton(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_baton")).args(args).output().expect("run baton");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn server_refuses_a_bad_broker_url_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, err) = baton(&["server", "--data-dir", dir.path().to_str().unwrap(), "--broker", "http://x:1883"]);
    assert!(!ok && err.contains("--broker") && err.contains("expected mqtt://HOST[:PORT]"), "{err}");
}

#[test]
fn server_says_when_the_mqtt_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let (ok, err) = baton(&[
        "server",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--mqtt-listen",
        &format!("127.0.0.1:{port}"),
    ]);
    assert!(!ok && err.contains(&format!("cannot listen for MQTT on 127.0.0.1:{port}")), "{err}");
    assert!(err.contains("--broker"), "{err}");
}

#[test]
fn completion_scripts_are_generated() {
    let out = Command::new(env!("CARGO_BIN_EXE_baton")).args(["completion", "bash"]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("baton"));
}
