//! `cross/install.sh` into a staging root: files in place, idempotent, the
//! written config is one the agent accepts (it comes online with its labels),
//! uninstall keeps config and data, purge removes them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use baton_tests::*;

fn install(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cross/install.sh");
    let out = Command::new("sh").arg(script).args(args).output().expect("run install.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "install.sh {args:?}: {text}");
    text
}

#[test]
fn install_upgrade_uninstall_and_purge_in_a_staging_root() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let root = world.path().join("root");
    let root_s = root.to_str().expect("utf-8");
    let agent = bin("baton-agent");
    let agent_s = agent.to_str().expect("utf-8");
    let broker = controller.broker_url();
    // The controller's signing key, as an operator gets it.
    let (ok, key, err) = baton_cli(&controller.server_url(), &["trust"]);
    assert!(ok && key.starts_with("ed25519:"), "baton trust: {key}{err}");
    let key = key.trim();
    install(&[
        "--root",
        root_s,
        "--binary",
        agent_s,
        "--broker",
        &broker,
        "--controller-key",
        key,
        "--device-id",
        "pi-inst",
        "--label",
        "site=lyon",
        "--label",
        "role=gw",
    ]);

    let unit = std::fs::read_to_string(root.join("etc/systemd/system/baton-agent.service")).expect("unit");
    assert!(unit.contains("KillMode=process") && unit.contains("Restart=always"), "{unit}");
    let config_path = root.join("etc/baton/agent.toml");
    let config = std::fs::read_to_string(&config_path).expect("config");
    assert!(root.join("usr/local/bin/baton-agent").exists() && root.join("var/lib/baton/agent").is_dir());
    // The A/B layout the agent upgrades itself in: the entry point links to
    // bin/current, which names this build by version and digest.
    let version = std::process::Command::new(&agent).arg("--version").output().expect("--version").stdout;
    let version = String::from_utf8_lossy(&version).trim().rsplit(' ').next().unwrap_or("").to_string();
    let current = std::fs::read_link(root.join("var/lib/baton/agent/bin/current")).expect("bin/current");
    assert!(current.to_string_lossy().starts_with(&format!("releases/baton-agent-{version}-")), "{current:?}");
    let entry = std::fs::read_link(root.join("usr/local/bin/baton-agent")).expect("the entry point is a link");
    assert_eq!(entry, Path::new("../../../var/lib/baton/agent/bin/current"));
    assert!(std::fs::canonicalize(root.join("usr/local/bin/baton-agent")).expect("resolves").is_file());
    assert!(config.contains(&format!("controller_keys = [\"{key}\"]")), "{config}");

    // Again, with another broker: the binary is replaced, the config kept.
    install(&["--root", root_s, "--binary", agent_s, "--broker", "mqtt://elsewhere:1883"]);
    assert_eq!(std::fs::read_to_string(&config_path).expect("config"), config, "an upgrade rewrote the config");
    assert!(!root.join("var/lib/baton/agent/bin/previous").exists(), "the same build again is no previous build");
    // Not an agent build: refused, nothing changed.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cross/install.sh");
    let junk = world.write("junk", "#!/bin/sh\n");
    let out =
        Command::new("sh").arg(script).args(["--root", root_s, "--binary", junk.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no Baton agent version stamp"));
    assert_eq!(std::fs::read_link(root.join("var/lib/baton/agent/bin/current")).expect("bin/current"), current);

    // The installed agent runs with the written config.
    let data = world.path().join("agent-data");
    let mut proc = Proc::spawn(
        "installed-agent",
        &root.join("usr/local/bin/baton-agent"),
        &[
            "--config".into(),
            config_path.display().to_string(),
            "--data-dir".into(),
            data.display().to_string(),
            "--no-workloads".into(),
        ],
        world.path(),
    );
    let d = wait_for("installed agent online", Duration::from_secs(20), || controller.device("pi-inst"));
    assert_eq!((d.labels["site"].as_str(), d.labels["role"].as_str()), ("lyon", "gw"));
    assert_eq!(proc.terminate(), Some(0));

    let out = install(&["--root", root_s, "--uninstall"]);
    assert!(out.contains("kept"), "{out}");
    assert!(
        !root.join("usr/local/bin/baton-agent").exists()
            && !root.join("etc/systemd/system/baton-agent.service").exists()
    );
    assert!(config_path.exists() && root.join("var/lib/baton/agent").is_dir(), "uninstall removed config or data");
    install(&["--root", root_s, "--uninstall", "--purge"]);
    assert!(!config_path.exists() && !root.join("var/lib/baton/agent").exists(), "purge left config or data");
}
