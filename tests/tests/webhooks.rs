//! Event webhooks against real HTTP receivers: each gets the events its
//! patterns name, signed with its secret, in order; one that hangs delays
//! neither the controller nor the others; a dead one shows its failures and
//! what waits in `baton webhook list`; webhooks survive a controller restart.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_controller::view::WebhookView;
use baton_tests::*;

/// What a receiver got: (headers, lowercased names, body) per request.
type Got = Arc<Mutex<Vec<(Vec<(String, String)>, Vec<u8>)>>>;

/// An HTTP receiver on a free port. With a gate, each answer waits for a
/// message on it (the test holds the receiver "hung" until it lets go).
fn receiver(gate: Option<Receiver<()>>) -> (u16, Got) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let got: Got = Arc::default();
    let seen = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut headers = Vec::new();
            let mut line = String::new();
            let _ = reader.read_line(&mut line); // request line
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = line.trim().split_once(':') {
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            let len: usize =
                headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            if let Some(g) = &gate {
                let _ = g.recv();
            }
            seen.lock().expect("lock").push((headers, body));
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (port, got)
}

fn names(got: &Got) -> Vec<String> {
    got.lock()
        .expect("lock")
        .iter()
        .filter_map(|(_, body)| {
            serde_json::from_slice::<serde_json::Value>(body).ok()?["name"].as_str().map(String::from)
        })
        .collect()
}

fn create(server: &str, url: &str, events: &str) -> (String, String) {
    let (ok, out, err) = baton_cli(server, &["webhook", "create", "--url", url, "--events", events]);
    assert!(ok, "{err}");
    // webhook/ID created; its signing secret (shown once): SECRET
    let id = out.split_once("webhook/").and_then(|(_, r)| r.split_whitespace().next()).expect("id").to_string();
    let secret = out.trim().rsplit(' ').next().expect("secret").to_string();
    (id, secret)
}

fn list(server: &str) -> Vec<WebhookView> {
    let (ok, out, err) = baton_cli(server, &["webhook", "list", "-o", "json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).expect("json")
}

#[test]
fn webhooks_get_what_they_ask_for_signed_and_a_hung_or_dead_one_holds_nothing_up() {
    let world = World::new();
    let mut controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();

    let (port_a, got_a) = receiver(None);
    let (release_b, gate_b): (Sender<()>, Receiver<()>) = channel();
    let (port_b, got_b) = receiver(Some(gate_b));
    let dead = free_port();
    let (id_a, secret_a) = create(&server, &format!("http://127.0.0.1:{port_a}/hook"), "workload.*");
    let (_, _) = create(&server, &format!("http://127.0.0.1:{port_b}/"), "*");
    let (id_c, _) = create(&server, &format!("http://127.0.0.1:{dead}/"), "token.*,workload.created");
    let (ok, _, err) = baton_cli(&server, &["webhook", "create", "--url", "ftp://x", "--events", "*"]);
    assert!(!ok && err.contains("http://"), "{err}");
    let (ok, _, err) = baton_cli(&server, &["webhook", "create", "--url", "http://x/", "--events", "device"]);
    assert!(!ok && err.contains("KIND.*"), "{err}");

    // Events: a workload created, a join token, the workload deleted.
    let manifest = world.path().join("app.yaml");
    std::fs::write(&manifest, "name: app\nimage: busybox:hook\n").expect("manifest");
    let (ok, _, err) = baton_cli(&server, &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    let (ok, _, err) = baton_cli(&server, &["token", "create"]);
    assert!(ok, "{err}");
    let (ok, _, err) = baton_cli(&server, &["delete", "workload", "app"]);
    assert!(ok, "{err}");

    // A: only workload events, in order, signed with its secret — while B hangs on its first one.
    wait_for("A's two workload events", Duration::from_secs(30), || {
        (names(&got_a) == ["workload.created", "workload.deleted"]).then_some(())
    });
    for (headers, body) in got_a.lock().expect("lock").iter() {
        let header = |k: &str| headers.iter().find(|(h, _)| h == k).map(|(_, v)| v.clone());
        let expected = format!(
            "sha256={}",
            baton_protocol::crypto::hex(&baton_protocol::crypto::hmac_sha256(secret_a.as_bytes(), body))
        );
        assert_eq!(header("x-baton-signature"), Some(expected), "signed with A's secret");
        assert_eq!(header("content-type").as_deref(), Some("application/json"));
    }
    // B is hung: what it has not taken waits, and the API answers meanwhile.
    let hooks = list(&server);
    let b = hooks.iter().find(|w| w.url.contains(&port_b.to_string())).expect("B listed");
    assert!(b.delivered == 0 && b.queued >= 3, "{b:?}");
    // C is dead: its failures and its queue are visible.
    let c = wait_for("C's failure in the list", Duration::from_secs(30), || {
        list(&server).into_iter().find(|w| w.id == id_c && w.failed_attempts > 0)
    });
    assert!(c.delivered == 0 && c.queued == 2 && c.last_error.is_some(), "{c:?}");
    // B lets go: everything arrives, in order.
    for _ in 0..20 {
        let _ = release_b.send(());
    }
    let all = wait_for("B's events", Duration::from_secs(30), || {
        let n = names(&got_b);
        n.iter().any(|e| e == "workload.deleted").then_some(n)
    });
    let created = all.iter().position(|e| e == "workload.created").expect("created");
    let token = all.iter().position(|e| e == "token.created").expect("token");
    let deleted = all.iter().position(|e| e == "workload.deleted").expect("deleted");
    assert!(created < token && token < deleted, "out of order: {all:?}");

    // Deleted, C is gone; A and B survive a restart and keep delivering.
    let (ok, _, err) = baton_cli(&server, &["webhook", "delete", &id_c]);
    assert!(ok, "{err}");
    controller.restart();
    let ids: Vec<String> = list(&server).into_iter().map(|w| w.id).collect();
    assert!(ids.len() == 2 && ids.contains(&id_a) && !ids.contains(&id_c), "{ids:?}");
    let (ok, _, err) = baton_cli(&server, &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    wait_for("A's event after the restart", Duration::from_secs(30), || {
        (names(&got_a).iter().filter(|e| *e == "workload.created").count() == 2).then_some(())
    });
}
