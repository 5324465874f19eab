//! The OpenAPI description against the running controller's routes: every
//! operation it lists is served (the router neither falls through to "no
//! such API endpoint" nor says 405), it is public while the rest of the API
//! wants a token, and what it says a device list looks like is what a
//! device list is. Also the two server-sent-event feeds, read as a tool
//! would.

use std::time::Duration;

use baton_tests::*;
use serde_json::Value;

#[test]
fn every_described_operation_is_served_and_nothing_else_is() {
    let world = World::new();
    let controller = Controller::start(&world, None, &["--api-auth"]);
    let base = format!("http://127.0.0.1:{}", controller.http);
    let root = std::fs::read_to_string(world.path().join("controller/admin.token")).expect("first admin token");
    let root = root.trim();
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into();

    // Public: no token.
    let mut r = http.get(format!("{base}/api/v1/openapi.json")).call().expect("openapi.json");
    assert_eq!(r.status(), 200);
    let spec: Value = r.body_mut().read_json().expect("JSON");
    assert_eq!(spec["openapi"], "3.0.3");
    let paths = spec["paths"].as_object().expect("paths");
    assert!(paths.len() > 40, "only {} paths", paths.len());

    let mut checked = 0;
    for (path, ops) in paths {
        // Path parameters get values no object has: handlers answer 404 or
        // 400 of their own, which is not the router's fall-through.
        let concrete = path
            .split('/')
            .map(|s| {
                if s.starts_with('{') {
                    if s == "{session}" {
                        "999999"
                    } else {
                        "no-such-thing"
                    }
                } else {
                    s
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in ops.as_object().expect("operations").keys() {
            let url = format!("{base}{concrete}");
            let auth = format!("Bearer {root}");
            let resp = match method.as_str() {
                "get" => http.get(&url).header("authorization", &auth).call(),
                "delete" => http.delete(&url).header("authorization", &auth).call(),
                "post" => http.post(&url).header("authorization", &auth).send_empty(),
                "put" => http.put(&url).header("authorization", &auth).send_empty(),
                "patch" => http.patch(&url).header("authorization", &auth).send_empty(),
                other => panic!("{other} {path}: a method this test does not know"),
            };
            let mut resp = resp.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            let status = resp.status().as_u16();
            // Streams (logs, events, rollouts) are not read to their end.
            let body = if resp.headers().get("content-type").is_some_and(|t| t == "text/event-stream") {
                String::new()
            } else {
                resp.body_mut().read_to_string().unwrap_or_default()
            };
            assert!(
                status != 405 && !body.contains("no such API endpoint"),
                "{method} {path} is described but not served: {status} {body}"
            );
            checked += 1;
        }
    }
    assert!(checked > 45, "checked only {checked} operations");

    // What is not described is not served.
    let mut r = http
        .get(format!("{base}/api/v1/nothing-here"))
        .header("authorization", format!("Bearer {root}"))
        .call()
        .expect("GET");
    assert_eq!(r.status(), 404);
    assert!(r.body_mut().read_to_string().expect("body").contains("no such API endpoint"));
    // The rest wants a token.
    assert_eq!(http.get(format!("{base}/api/v1/devices")).call().expect("GET").status(), 401);

    // The schema of a device list names the fields a real one has.
    let device = &spec["components"]["schemas"]["DeviceView"]["properties"];
    for field in ["id", "status", "labels", "last_seen_ms", "inventory"] {
        assert!(device.get(field).is_some(), "DeviceView lacks {field}: {device}");
    }
}

/// Reads server-sent events from `reader` until one of `kind` whose data
/// satisfies `ok`; its data.
fn next_event(reader: &mut impl std::io::BufRead, kind: &str, ok: impl Fn(&str) -> bool) -> String {
    let (mut event, mut line) = (String::new(), String::new());
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).expect("read the stream") > 0, "the stream ended");
        if let Some(k) = line.strip_prefix("event: ") {
            event = k.trim().to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            if event == kind && ok(data.trim()) {
                return data.trim().to_string();
            }
        }
    }
}

#[test]
fn the_event_and_rollout_feeds_push_what_happens() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let base = format!("http://127.0.0.1:{}", controller.http);
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();

    let events = http.get(format!("{base}/api/v1/events/stream")).call().expect("event stream");
    assert_eq!(events.headers().get("content-type").map(|v| v.to_str().unwrap_or("")), Some("text/event-stream"));
    let mut events = std::io::BufReader::new(events.into_body().into_reader());
    // Something happens after the feed opened: it arrives.
    let (ok, _, err) =
        baton_cli(&controller.server_url(), &["apitoken", "create", "--role", "read-only", "--name", "watcher"]);
    assert!(ok, "{err}");
    let e: Value = serde_json::from_str(&next_event(&mut events, "event", |d| d.contains("watcher"))).expect("JSON");
    assert_eq!(e["name"], "apitoken.created", "{e}");

    // A workload nobody runs has had no rollout: `null`, at once.
    apply_yaml(
        &controller.server_url(),
        &world,
        "w.yaml",
        "name: lonely\nimage: 127.0.0.1:9/lonely:1\nplacement: {selector: {nobody: here}}\n",
    );
    let watch = http.get(format!("{base}/api/v1/workloads/lonely/rollout/watch")).call().expect("watch");
    assert_eq!(watch.status(), 200);
    let mut watch = std::io::BufReader::new(watch.into_body().into_reader());
    assert_eq!(next_event(&mut watch, "rollout", |_| true), "null");
    // Deleted: the feed says so and ends.
    let (ok, _, err) = baton_cli(&controller.server_url(), &["delete", "workload", "lonely"]);
    assert!(ok, "{err}");
    let gone = next_event(&mut watch, "gone", |_| true);
    assert!(gone.contains("not found"), "{gone}");
    // An unknown workload is a 404, not an empty feed.
    assert_eq!(http.get(format!("{base}/api/v1/workloads/nope/rollout/watch")).call().expect("GET").status(), 404);
}
