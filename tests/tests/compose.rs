//! Compose files applied as they are: `baton apply -f docker-compose.yml`
//! runs each service as a workload on a real device (busybox containers):
//! environment (and an env file read by the CLI), a named volume, a tmpfs, a health check as readiness,
//! `depends_on` as service discovery, the services on the device's bridge
//! (Compose's default network) with a published port reached from the host; a key outside the subset is refused by name and stores nothing.
//! Root only (CI is root).

use std::io::{Read, Write};
use std::time::Duration;

use baton_controller::view::WorkloadView;
use baton_tests::*;

fn describe(server: &str, name: &str) -> Option<WorkloadView> {
    let (ok, out, _) = baton_cli(server, &["describe", "workload", name, "-o", "json"]);
    ok.then(|| serde_json::from_str(&out).ok()).flatten()
}

fn exec(server: &str, workload: &str, script: &str) -> Option<String> {
    let (ok, out, _) = baton_cli(server, &["exec", "--device", "pi-compose", workload, "--", "/bin/sh", "-c", script]);
    ok.then_some(out)
}

fn http_get(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn a_compose_project_runs_as_written() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    give_busybox(&world, "pi-compose", "busybox:compose");
    let mut agent = start_agent(&world, "pi-compose", &controller.broker_url(), &[]);
    wait_for("the device", Duration::from_secs(20), || (controller.devices().len() == 1).then_some(()));

    let port = free_port();
    let compose = world.path().join("docker-compose.yml");
    std::fs::write(
        &compose,
        format!(
            r#"version: "3.8"
services:
  db:
    image: busybox:compose
    command: sh -c 'echo "$$ROLE" > /data/role; touch /data/ready; while true; do sleep 1; done'
    environment:
      ROLE: primary
    volumes:
      - dbdata:/data
    healthcheck:
      test: ["CMD-SHELL", "test -f /data/ready"]
      interval: 1s
      timeout: 1s
      retries: 3
    restart: unless-stopped
  web:
    image: busybox:compose
    entrypoint: ["/bin/sh", "-c"]
    command: ["echo \"$$GREETING $$SUFFIX\" > /www/index.html; exec httpd -f -p {port} -h /www"]
    env_file: web.env
    environment:
      - SUFFIX=from web
    ports:
      - "{port}:{port}"
    tmpfs:
      - /www:size=1m
    depends_on:
      db:
        condition: service_healthy
volumes:
  dbdata:
"#
        ),
    )
    .expect("compose file");
    // Read where `baton apply` runs, as Compose reads it where it runs.
    std::fs::write(world.path().join("web.env"), "# greeting\nGREETING=hello\n").expect("env file");
    let (ok, out, err) = baton_cli(&server, &["apply", "-f", compose.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    assert!(out.contains("workload/db created") && out.contains("workload/web created"), "{out}");

    wait_for("db healthy (its healthcheck is the readiness probe)", Duration::from_secs(60), || {
        describe(&server, "db").filter(|w| w.healthy() == 1).map(|_| ())
    });
    wait_for("web running", Duration::from_secs(60), || {
        describe(&server, "web").filter(|w| w.running() == 1).map(|_| ())
    });

    // `$$ROLE` is Compose's escape for a literal `$`: the shell in the container expands it.
    let role = wait_for("db wrote its role into the named volume", Duration::from_secs(30), || {
        exec(&server, "db", "cat /data/role").filter(|o| !o.trim().is_empty())
    });
    assert_eq!(role.trim(), "primary");
    let page = wait_for("the published port, from the host", Duration::from_secs(30), || {
        http_get(port).filter(|p| p.contains("200"))
    });
    assert!(page.contains("hello from web"), "{page}");
    // The tmpfs is a tmpfs, and depends_on made db a service web uses.
    let mounts = exec(&server, "web", "grep ' /www ' /proc/mounts").expect("mounts");
    assert!(mounts.contains("tmpfs"), "{mounts}");
    assert_eq!(
        exec(&server, "web", "test -e /run/baton/services/db && echo yes").as_deref().map(str::trim),
        Some("yes")
    );

    // The named volume outlives a new revision: a changed environment restarts db, the data stays.
    let edited = std::fs::read_to_string(&compose).expect("read").replace("ROLE: primary", "ROLE: replica");
    std::fs::write(&compose, edited).expect("write");
    let (ok, out, err) = baton_cli(&server, &["apply", "-f", compose.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    assert!(out.contains("workload/db updated (revision 2)") && out.contains("workload/web unchanged"), "{out}");
    wait_for("db's revision 2 wrote its role", Duration::from_secs(60), || {
        exec(&server, "db", "cat /data/role").filter(|o| o.trim() == "replica").map(|_| ())
    });

    // From stdin, as `cat docker-compose.yml | baton apply -f -`: the same file, nothing changes.
    let out = std::process::Command::new(bin("baton"))
        .args(["apply", "-f", "-"])
        .env("BATON_SERVER", &server)
        .env_remove("BATON_TOKEN")
        .stdin(std::fs::File::open(&compose).expect("compose file"))
        .current_dir(world.path())
        .output()
        .expect("baton apply -f -");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("workload/db unchanged") && stdout.contains("workload/web unchanged"), "{stdout}");

    // Outside the subset: refused by name, nothing stored.
    let bad = world.path().join("compose-bad.yml");
    std::fs::write(&bad, "services:\n  api:\n    image: busybox:compose\n    ports: ['127.0.0.1:8080:80']\n")
        .expect("write");
    let (ok, _, err) = baton_cli(&server, &["apply", "-f", bad.to_str().expect("utf-8")]);
    assert!(!ok, "a port mapping Baton cannot honour was accepted");
    assert!(err.contains("services.api.ports[0]") && err.contains("write 8080:80"), "{err}");
    assert!(describe(&server, "api").is_none(), "a refused file stored a workload");
    assert!(agent.is_running(), "the agent died");
}
