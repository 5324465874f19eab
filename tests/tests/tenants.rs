//! Tenants through the API, with real agents and containers: an operator of
//! tenant A cannot list, read or change anything of tenant B, workloads run
//! only on their tenant's devices, and services do not cross tenants. Root
//! (real containers).

use std::time::Duration;

use baton_controller::view::{DeviceView, Event, SecretView, WorkloadView};
use baton_tests::*;

const LOOP: &str = "while true; do sleep 0.2; done";

struct Api {
    server: String,
}

impl Api {
    fn run(&self, token: &str, args: &[&str]) -> (bool, String, String) {
        baton_cli_as(&self.server, Some(token), args)
    }

    fn ok(&self, token: &str, args: &[&str]) -> String {
        let (ok, out, err) = self.run(token, args);
        assert!(ok, "baton {args:?} failed: {err}");
        out
    }

    /// The request is refused with `status` (and nothing is said of the object).
    fn refused(&self, token: &str, args: &[&str], status: &str) -> String {
        let (ok, out, err) = self.run(token, args);
        assert!(
            !ok && err.contains(&format!("HTTP {status}")),
            "baton {args:?} was not refused with {status}: {out}{err}"
        );
        err
    }

    fn json<T: serde::de::DeserializeOwned>(&self, token: &str, args: &[&str]) -> T {
        let args: Vec<&str> = args.iter().copied().chain(["-o", "json"]).collect();
        serde_json::from_str(&self.ok(token, &args)).expect("JSON")
    }

    /// Devices running `name` (as the fleet admin sees it), once every placed one runs it.
    fn running_on(&self, token: &str, name: &str) -> Option<Vec<String>> {
        let (ok, out, _) = self.run(token, &["describe", "workload", name, "-o", "json"]);
        let w: WorkloadView = ok.then(|| serde_json::from_str(&out).ok()).flatten()?;
        (w.running() == w.devices.len()).then(|| w.devices.iter().map(|d| d.device.clone()).collect())
    }
}

fn write(world: &World, name: &str, text: &str) -> String {
    let path = world.path().join(name);
    std::fs::write(&path, text).expect("manifest");
    path.to_str().expect("utf-8").to_string()
}

#[test]
fn a_tenant_sees_and_changes_only_its_own_devices_workloads_secrets_and_tokens() {
    let world = World::new();
    let controller = Controller::start(&world, None, &["--api-auth"]);
    let api = Api { server: controller.server_url() };
    let root = std::fs::read_to_string(world.path().join("controller/admin.token")).expect("first admin token");
    let root = root.trim();

    // The fleet-wide admin makes each tenant's tokens.
    let token = |tenant: &str, role: &str| {
        let t = api.ok(root, &["--tenant", tenant, "apitoken", "create", "--role", role, "--name", tenant]);
        assert!(t.starts_with("baton-api."), "{t}");
        t.trim().to_string()
    };
    let (acme, globex, acme_reader) = (token("acme", "admin"), token("globex", "admin"), token("acme", "read-only"));

    // Two devices; they join the default tenant, and the fleet admin hands them out.
    let mut agents = Vec::new();
    for device in ["pi-acme", "pi-globex"] {
        give_busybox(&world, device, "busybox:sd");
        agents.push(start_agent(&world, device, &controller.broker_url(), &[]));
    }
    wait_for("two devices", Duration::from_secs(20), || {
        (api.json::<Vec<DeviceView>>(root, &["get", "devices"]).len() == 2).then_some(())
    });
    let err = api.refused(&acme, &["device", "assign", "pi-globex", "acme"], "403");
    assert!(err.contains("fleet-wide"), "{err}");
    api.ok(root, &["device", "assign", "pi-acme", "acme"]);
    api.ok(root, &["device", "assign", "pi-globex", "globex"]);

    let ids = |token: &str| -> Vec<String> {
        api.json::<Vec<DeviceView>>(token, &["get", "devices"]).into_iter().map(|d| d.id).collect()
    };
    assert_eq!(ids(&acme), ["pi-acme"]);
    assert_eq!(ids(&globex), ["pi-globex"]);
    assert_eq!(ids(&acme_reader), ["pi-acme"]);
    assert_eq!(ids(root), ["pi-acme", "pi-globex"]);
    // Another tenant's device is as unknown as one that does not exist.
    api.refused(&acme, &["describe", "device", "pi-globex"], "404");
    api.refused(&acme, &["label", "device", "pi-globex", "x=y"], "404");
    api.refused(&acme, &["device", "revoke", "pi-globex"], "404");
    api.refused(&acme, &["device", "credentials", "pi-globex"], "404");

    // Secrets: names are the tenant's; values never cross.
    api.ok(&acme, &["secret", "create", "db-pass", "--from-literal", "acme-only"]);
    let names = |token: &str| -> Vec<String> {
        api.json::<Vec<SecretView>>(token, &["secret", "list"]).into_iter().map(|s| s.name).collect()
    };
    assert_eq!(names(&acme), ["db-pass"]);
    assert!(names(&globex).is_empty());
    let err = api.refused(&globex, &["secret", "create", "db-pass", "--from-literal", "mine"], "400");
    assert!(err.contains("taken"), "{err}");
    api.refused(&globex, &["secret", "delete", "db-pass"], "404");
    let stolen = write(
        &world,
        "steal.yaml",
        "name: thief\nimage: busybox:sd\nsecrets: [{name: db-pass, path: /run/secrets/db}]\n",
    );
    let err = api.refused(&globex, &["apply", "-f", &stolen], "400");
    assert!(err.contains("db-pass does not exist"), "{err}");

    // Workloads without any selector: the tenant alone confines them.
    let acme_apps = write(
        &world,
        "acme.yaml",
        &format!(
            "name: web-acme\nimage: busybox:sd\ncommand: [/bin/sh, -c, '{LOOP}']\nports: [{{name: http, port: 8080}}]\n---\nname: client-acme\nimage: busybox:sd\ncommand: [/bin/sh, -c, '{LOOP}']\nuses: [web-acme]\n"
        ),
    );
    let globex_apps = write(
        &world,
        "globex.yaml",
        &format!("name: client-globex\nimage: busybox:sd\ncommand: [/bin/sh, -c, '{LOOP}']\nuses: [web-acme]\n"),
    );
    api.ok(&acme, &["apply", "-f", &acme_apps]);
    api.ok(&globex, &["apply", "-f", &globex_apps]);
    for (name, device) in [("web-acme", "pi-acme"), ("client-acme", "pi-acme"), ("client-globex", "pi-globex")] {
        let on = wait_for(&format!("{name} running"), Duration::from_secs(60), || {
            api.running_on(root, name).filter(|d| !d.is_empty())
        });
        assert_eq!(on, [device], "{name} ran outside its tenant");
    }
    let workloads = |token: &str| -> Vec<(String, String)> {
        api.json::<Vec<WorkloadView>>(token, &["get", "workloads"]).into_iter().map(|w| (w.name, w.tenant)).collect()
    };
    assert_eq!(workloads(&acme), [("client-acme".into(), "acme".into()), ("web-acme".into(), "acme".into())]);
    assert_eq!(workloads(&globex), [("client-globex".to_string(), "globex".to_string())]);
    assert_eq!(workloads(root).len(), 3);

    // Nothing of globex's can be read or changed by acme, and its name is taken.
    for args in [
        &["describe", "workload", "client-globex"][..],
        &["delete", "workload", "client-globex"],
        &["scale", "client-globex", "--replicas", "1"],
        &["rollout", "status", "client-globex"],
        &["rollout", "undo", "client-globex"],
        &["logs", "client-globex", "--device", "pi-globex"],
        &["exec", "--device", "pi-globex", "client-globex", "--", "true"],
        &["restart", "client-globex", "--device", "pi-globex"],
    ] {
        api.refused(&acme, args, "404");
    }
    let taken = write(&world, "taken.yaml", "name: client-globex\nimage: busybox:sd\n");
    let err = api.refused(&acme, &["apply", "-f", &taken], "400");
    assert!(err.contains("taken by another tenant"), "{err}");
    // The fleet admin is told whose it is.
    let err = api.refused(root, &["apply", "-f", &taken], "400");
    assert!(err.contains("--tenant globex"), "{err}");
    assert_eq!(api.running_on(root, "client-globex").as_deref(), Some(&["pi-globex".to_string()][..]));
    // Its own devices are reachable as ever.
    let out = api.ok(&acme, &["exec", "--device", "pi-acme", "web-acme", "--", "echo", "inside"]);
    assert_eq!(out.trim(), "inside");

    // Services do not cross tenants: acme's client finds web-acme's endpoint,
    // globex's client, using the same name, finds none.
    let cat = |token: &str, device: &str, workload: &str| {
        let script = "test -f /run/baton/services/web-acme && echo \"[$(cat /run/baton/services/web-acme)]\"";
        let (ok, out, _) = api.run(token, &["exec", "--device", device, workload, "--", "/bin/sh", "-c", script]);
        ok.then(|| out.trim().to_string())
    };
    wait_for("web-acme's endpoint in acme's client", Duration::from_secs(30), || {
        cat(&acme, "pi-acme", "client-acme").filter(|s| s.contains(":8080 http pi-acme"))
    });
    assert_eq!(cat(&globex, "pi-globex", "client-globex").as_deref(), Some("[]"));

    // Events: each tenant reads its own story only.
    let events: Vec<Event> = api.json(&acme, &["get", "events"]);
    assert!(events.iter().any(|e| e.subject == "web-acme"), "{events:?}");
    assert!(events.iter().all(|e| e.tenant == "acme"), "acme read another tenant's events: {events:?}");
    let all: Vec<Event> = api.json(root, &["get", "events"]);
    assert!(all.iter().any(|e| e.subject == "client-globex"));

    // Join and API tokens.
    let join = api.ok(&acme, &["token", "create"]);
    let join_id = join.split('.').nth(1).expect("token id").to_string();
    let listed = |token: &str| api.json::<Vec<serde_json::Value>>(token, &["token", "list"]).len();
    assert_eq!((listed(&acme), listed(&globex)), (1, 0));
    api.refused(&globex, &["token", "delete", &join_id], "404");
    let api_ids = |token: &str| -> Vec<String> {
        let list: Vec<serde_json::Value> = api.json(token, &["apitoken", "list"]);
        list.iter().map(|t| t["id"].as_str().unwrap_or_default().to_string()).collect()
    };
    assert_eq!(api_ids(&acme).len(), 2, "acme sees its admin and reader tokens only");
    assert_eq!(api_ids(root).len(), 4, "root, acme ×2, globex");
    let acme_reader_id = acme_reader.split('.').nth(1).expect("id");
    api.refused(&globex, &["apitoken", "revoke", acme_reader_id], "404");
    // A tenant's token cannot act for another tenant, nor make a fleet-wide token.
    let err = api.refused(&acme, &["--tenant", "globex", "get", "workloads"], "403");
    assert!(err.contains("tenant acme"), "{err}");
    let made = api.ok(&acme, &["apitoken", "create", "--role", "admin", "--name", "more"]);
    let list: Vec<serde_json::Value> = api.json(root, &["apitoken", "list"]);
    let id = made.split('.').nth(1).expect("id");
    let new = list.iter().find(|t| t["id"] == id).expect("the new token");
    assert_eq!(new["tenant"], "acme", "a tenant admin made a token outside its tenant");
    // Read-only stays read-only within its tenant.
    api.refused(&acme_reader, &["apply", "-f", &acme_apps], "403");

    // Moving a device moves the work: globex's client leaves it, acme's workloads arrive.
    api.ok(root, &["device", "assign", "pi-globex", "acme"]);
    wait_for("web-acme on both devices", Duration::from_secs(60), || {
        api.running_on(root, "web-acme").filter(|d| d.len() == 2)
    });
    wait_for("client-globex gone from pi-globex", Duration::from_secs(30), || {
        api.running_on(root, "client-globex").filter(|d| d.is_empty())
    });
    assert!(ids(&globex).is_empty());
    assert_eq!(ids(&acme), ["pi-acme", "pi-globex"]);
    drop(agents);
}
