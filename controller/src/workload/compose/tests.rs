//! The Compose subset: a usual project, every refusal with its field path
//! and advice, interpolation, env files, words, durations and sizes.

use super::*;

fn compose(text: &str) -> Checked<Vec<Manifest>> {
    let doc: Value = serde_yaml::from_str(text).expect("yaml");
    assert!(is_compose(&doc));
    manifests(&doc)
}

fn refused(text: &str) -> FieldError {
    compose(text).expect_err("refused")
}

#[test]
fn a_project_in_the_usual_style() {
    let text = r#"
version: "3.8"
services:
  db:
    image: postgres:16-alpine
    environment:
      POSTGRES_PASSWORD: example
      POSTGRES_DB: app
    volumes:
      - pgdata:/var/lib/postgresql/data
    healthcheck:
      test: ["CMD-SHELL", "pg_isready -U postgres"]
      interval: 10s
      timeout: 5s
      retries: 5
      start_period: 1m
    restart: unless-stopped
  web:
    image: registry.local/web:1.4
    entrypoint: ["/app/web"]
    command: --port 8080 --db "host=db user=postgres"
    ports:
      - "8080:8080"
      - 9090/udp
    environment:
      - MODE=production
      - EMPTY=
    depends_on:
      db:
        condition: service_healthy
    volumes:
      - /srv/web/config:/etc/web:ro
      - type: tmpfs
        target: /tmp
        tmpfs: {size: 16m}
    devices: ["/dev/ttyUSB0:/dev/ttyUSB0:rwm"]
    user: "1000:1000"
    deploy:
      replicas: 2
      resources:
        limits: {memory: 256m, cpus: "0.5"}
    x-baton:
      placement: {selector: {site: lyon}}
      rollout: {waves: [1, 50%, 100%], min_ready: 30}
volumes:
  pgdata:
"#;
    let ms = compose(text).expect("the common subset");
    assert_eq!(ms.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["db", "web"]);
    let (db, web) = (&ms[0], &ms[1]);
    assert_eq!(db.env["POSTGRES_DB"], "app");
    assert_eq!(db.volumes[0].name.as_deref(), Some("pgdata"));
    assert_eq!(db.restart, RestartName::Always);
    let r = db.readiness.as_ref().expect("healthcheck → readiness");
    assert_eq!(r.exec.as_deref(), Some(&["/bin/sh".to_string(), "-c".into(), "pg_isready -U postgres".into()][..]));
    assert_eq!((r.interval, r.timeout, r.failure_threshold, r.initial_delay), (10, 5, 5, 60));
    assert_eq!(web.command, ["/app/web"]);
    assert_eq!(web.args, ["--port", "8080", "--db", "host=db user=postgres"]);
    assert_eq!(
        web.ports.iter().map(|p| (p.port, p.protocol.clone())).collect::<Vec<_>>(),
        [(8080, None), (9090, Some("udp".into()))]
    );
    assert_eq!(web.env["MODE"], "production");
    assert_eq!(web.env["EMPTY"], "");
    assert_eq!(web.uses, ["db"]);
    assert_eq!(web.volumes[0].host_path.as_deref(), Some("/srv/web/config"));
    assert!(web.volumes[0].read_only);
    assert_eq!(web.volumes[1].tmpfs.as_deref(), Some("16Mi"));
    assert_eq!(web.devices, ["/dev/ttyUSB0"]);
    assert_eq!(web.user.as_deref(), Some("1000:1000"));
    assert_eq!(web.replicas, Some(2));
    assert_eq!(web.resources.memory.as_deref(), Some("256Mi"));
    assert_eq!(web.resources.cpu.as_deref(), Some("0.5"));
    assert_eq!(web.placement.selector["site"], "lyon");
    assert!(web.rollout.is_some());
    // Both validate as Baton manifests.
    for m in &ms {
        super::super::validate(m).unwrap_or_else(|e| panic!("{}: {e}", m.name));
    }
}

#[test]
fn what_is_refused_is_named() {
    for (text, field, says) in [
        ("services: {a: {image: x, build: .}}", "services.a.build", "build and push"),
        (
            "services: {a: {image: x, network_mode: host, ports: ['8080:80']}}",
            "services.a.ports",
            "map 80:80 or drop network_mode",
        ),
        ("services: {a: {image: x, ports: ['127.0.0.1:80:80']}}", "services.a.ports[0]", "write 80:80"),
        ("services: {a: {image: x, ports: ['8000-8010']}}", "services.a.ports[0]", "ranges"),
        ("services: {a: {image: x, volumes: ['./data:/data']}}", "services.a.volumes[0]", "absolute path"),
        ("services: {a: {image: x, volumes: ['data:/data']}}", "services.a.volumes[0]", "not declared"),
        ("services: {a: {image: x, volumes: ['/data']}}", "services.a.volumes[0]", "anonymous"),
        ("services: {a: {image: x, environment: [HOME]}}", "services.a.environment.HOME", "give a value"),
        ("services: {a: {image: x, environment: {HOME: }}}", "services.a.environment.HOME", "give a value"),
        ("services: {a: {image: x, env_file: .env}}", "services.a.env_file", "environment:"),
        ("services: {a: {image: x, restart: 'on-failure:3'}}", "services.a.restart", "on-failure"),
        ("services: {a: {image: x, networks: [backend]}}", "services.a.networks", "one bridge network"),
        ("services: {a: {image: x, network_mode: 'container:b'}}", "services.a.network_mode", "bridge (the default)"),
        ("services: {a: {image: x, labels: {k: v}}}", "services.a.labels", "selector"),
        ("services: {a: {image: x, container_name: c}}", "services.a.container_name", "after its service"),
        ("services: {a: {image: x, stop_signal: SIGINT}}", "services.a.stop_signal", "no Baton equivalent"),
        ("services: {a: {image: x, ulimits: {}}}", "services.a.ulimits", "not supported"),
        ("services: {a: {image: x, deploy: {placement: {}}}}", "services.a.deploy.placement", "x-baton"),
        (
            "services: {a: {image: x, deploy: {resources: {reservations: {}}}}}",
            "services.a.deploy.resources.reservations",
            "limits",
        ),
        ("services: {a: {image: x, devices: ['/dev/a:/dev/b']}}", "services.a.devices[0]", "own path"),
        ("services: {a: {image: x, healthcheck: {test: [CMD]}}}", "services.a.healthcheck.test", "CMD"),
        ("services: {a: {image: x, x-baton: {bogus: 1}}}", "services.a.x-baton.bogus", "not a Baton setting"),
        ("services: {a: {command: x}}", "services.a.image", "needs an image"),
        ("services: {a: {image: x}}\nnetworks: {n: {}}", "networks", "one bridge network"),
        ("services: {a: {image: x}}\nsecrets: {s: {file: s}}", "secrets", "baton secret create"),
        ("services: {a: {image: x}}\nvolumes: {v: {driver: nfs}}", "volumes.v", "drivers"),
        ("services: {a: {image: x}}\nconfigs: {}", "configs", "not supported"),
        ("name: shop\nservices: {a: {image: x}}", "name", "no projects"),
        ("services: {a: {image: x, depends_on: [nosuch]}}", "services.a.depends_on", "not a service of this file"),
        (
            "services: {a: {image: x, ports: ['80:80']}, b: {image: y, ports: ['80']}}",
            "services.b.ports",
            "device port 80 is published by a",
        ),
        (
            "services: {a: {image: x, network_mode: host, ports: ['80']}, b: {image: y, ports: ['80']}}",
            "services.b.ports",
            "device port 80 is published by a",
        ),
        ("services: {a: {image: x, network_mode: none, ports: ['80:80']}}", "services.a.ports", "network_mode: none"),
        ("services: {a: {image: x, mem_limit: 64m}}", "services.a.mem_limit", "deploy.resources.limits.memory"),
        ("services: {a: {image: x, init: true}}", "services.a.init", "remove it"),
        ("services: {a: {image: x, x-baton: {replicas: 2}}}", "services.a.x-baton.replicas", "deploy.replicas"),
    ] {
        let e = refused(text);
        assert_eq!(e.field, field, "{text}");
        assert!(e.message.contains(says), "{text}: {}", e.message);
    }
}

#[test]
fn compose_defaults_merge_keys_and_port_names() {
    let text = "x-common: &common\n  image: app:1\n  environment: {LOG: info}\nservices:\n  a:\n    <<: *common\n    ports: ['0.0.0.0:8080:8080', {target: 9000, name: metrics}]\n  b:\n    <<: *common\n    restart: always\n";
    let ms = compose(text).expect("merge keys apply");
    let (a, b) = (&ms[0], &ms[1]);
    assert_eq!((a.image.as_str(), a.env["LOG"].as_str()), ("app:1", "info"));
    assert_eq!(a.restart, RestartName::Never, "Compose's default restart is no");
    assert_eq!(b.restart, RestartName::Always);
    assert_eq!(
        a.ports.iter().map(|p| (p.name.as_str(), p.port)).collect::<Vec<_>>(),
        [("p8080", 8080), ("metrics", 9000)]
    );
}

#[test]
fn words_split_as_a_shell_would() {
    for (text, want) in [
        ("a b  c", vec!["a", "b", "c"]),
        (r#"sh -c "echo 'hi there'""#, vec!["sh", "-c", "echo 'hi there'"]),
        (r#"a 'b c' "d \"e\"" f\ g"#, vec!["a", "b c", "d \"e\"", "f g"]),
        ("''", vec![""]),
        ("", vec![]),
    ] {
        assert_eq!(split_words(text).expect(text), want, "{text}");
    }
    assert!(split_words("'open").is_err());
    assert!(split_words("\"open").is_err());
}

#[test]
fn env_files_are_inlined_under_environment() {
    let text = "services:\n  web:\n    image: x\n    env_file: [a.env, {path: b.env}]\n    environment: {WINS: compose}\n  db:\n    image: y\n";
    let read = |p: &str| match p {
        "a.env" => Ok("# comment\nA=1\nexport B='two words'\nWINS=file\n\n".to_string()),
        "b.env" => Ok("A=\"overridden\"\n".to_string()),
        other => Err(format!("no {other}")),
    };
    let inlined = inline_env_files(text, read).expect("inlined").expect("had env files");
    let ms = compose(&inlined).expect("valid");
    let env = &ms.iter().find(|m| m.name == "web").expect("web").env;
    assert_eq!(env.get("A").map(String::as_str), Some("overridden"));
    assert_eq!(env.get("B").map(String::as_str), Some("two words"));
    assert_eq!(env.get("WINS").map(String::as_str), Some("compose"), "environment wins");
    assert_eq!(inline_env_files("services: {a: {image: x}}", read), Ok(None), "nothing to inline");
    assert_eq!(inline_env_files("name: a\nimage: x\n", read), Ok(None), "not Compose");
    let missing = inline_env_files("services: {a: {image: x, env_file: c.env}}", read).unwrap_err();
    assert!(missing.contains("services.a.env_file: c.env: no c.env"), "{missing}");
    let shell = parse_env_file("HOME\n").unwrap_err();
    assert!(shell.contains("line 1") && shell.contains("KEY=VALUE"), "{shell}");
}

#[test]
fn variables_a_compose_user_expects_read_are_named() {
    let text = "services: {a: {image: \"app:${TAG:-1}\", environment: {L: \"${LOG:-info}\", M: \"${TAG:-2}\"}}}";
    let w = unread_variables(text, true, |v| v == "TAG");
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].contains(".env") && w[1].contains("shell's TAG"), "{w:?}");
    assert!(unread_variables(text, false, |_| false).is_empty());
    assert!(unread_variables("name: a\nimage: \"${TAG:-1}\"\n", true, |_| true).is_empty(), "not Compose");
}

#[test]
fn interpolation() {
    for (text, want) in [
        ("plain", Ok("plain")),
        ("$$HOME and $$", Ok("$HOME and $")),
        ("${TAG:-1.2}", Ok("1.2")),
        ("${TAG-latest}x", Ok("latestx")),
        ("cost: 5$", Ok("cost: 5$")),
        ("${V:-${W:-nested}}", Ok("nested")),
        ("a${V:+alt}b", Ok("ab")),
    ] {
        assert_eq!(interpolate(text).as_deref(), want.map_err(|_: ()| String::new()).as_deref(), "{text}");
    }
    for text in ["$HOME", "${TAG}", "${TAG", "${V:-${W}}", "${}"] {
        assert!(interpolate(text).is_err(), "{text}");
    }
    let e = interpolate("${DB:?set DB}").unwrap_err();
    assert!(e.starts_with("${DB} must be set (set DB)"), "{e}");
    let e = refused("services: {a: {image: \"app:${TAG}\"}}");
    assert_eq!(e.field, "services.a.image");
    assert!(e.message.contains("TAG:-DEFAULT"), "{}", e.message);
}

#[test]
fn durations_and_sizes() {
    for (text, want) in [("30s", 30), ("1m30s", 90), ("500ms", 1), ("1h", 3600), ("2", 0)] {
        let got = seconds(&Value::String(text.into()), "f");
        if want == 0 {
            assert!(got.is_err(), "{text}");
        } else {
            assert_eq!(got.expect(text), want, "{text}");
        }
    }
    for (text, want) in [("256m", "256Mi"), ("1g", "1Gi"), ("1gb", "1Gi"), ("512k", "512Ki"), ("1000", "1000")] {
        assert_eq!(compose_bytes(text), want);
    }
}

#[test]
fn services_run_on_the_bridge_with_their_ports_published_as_written() {
    let text = "services:\n  web:\n    image: x\n    ports: ['8080:80', '5353:53/udp', '9000']\n    expose: ['7000']\n  cache:\n    image: y\n    network_mode: host\n    ports: ['6379:6379']\n";
    let out = compose(text).expect("compose");
    let web = out.iter().find(|m| m.name == "web").expect("web");
    assert_eq!(web.network, NetworkName::Bridge);
    let ports: Vec<(u16, Option<u16>)> = web.ports.iter().map(|p| (p.port, p.publish)).collect();
    assert_eq!(ports, vec![(80, Some(8080)), (53, Some(5353)), (9000, Some(9000)), (7000, None)]);
    let spec = super::super::validate(web).expect("valid");
    assert_eq!(spec.container.network, baton_protocol::spec::NetworkMode::Bridge);
    assert_eq!(spec.container.publish.len(), 3);
    let cache = out.iter().find(|m| m.name == "cache").expect("cache");
    assert_eq!((cache.network, cache.ports[0].publish), (NetworkName::Host, None));
}
