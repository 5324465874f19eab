//! The OpenAPI description against the running controller's routes: every
//! operation it lists is served (the router neither falls through to "no
//! such API endpoint" nor says 405), it is public while the rest of the API
//! wants a token, and what it says a device list looks like is what a
//! device list is.

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
