//! The dashboard in a real browser (Debian's chromium, headless, through
//! chromedriver) against a controller with `--api-auth`, a simulated fleet
//! and one real device with a real container: log in with a token, find
//! devices, set a label, watch a rollout move through its waves without a
//! reload, pause and resume it from the page, tail a log that keeps coming,
//! see the event feed move, and see a read-only token get no buttons and a
//! tenant's token only its own devices. Phone-sized too. Root (a real
//! container). A failing test leaves a screenshot and the page's HTML in
//! `target/test-artifacts/`.

use std::time::Duration;

use baton_controller::rollout::State;
use baton_controller::view::{DeviceView, RolloutView, WorkloadView};
use baton_protocol::{Health, Phase};
use baton_tests::webdriver::Browser;
use baton_tests::*;

const T: Duration = Duration::from_secs(30);

fn app(tag: &str) -> String {
    // Slow enough waves (8 s healthy each) that a person, or this test, can pause it.
    format!("name: app\nimage: 127.0.0.1:9/app:{tag}\nplacement: {{selector: {{sim: \"yes\"}}}}\nrollout: {{waves: [1, 50%], min_ready: 8}}\n")
}

struct Api {
    server: String,
    root: String,
}

impl Api {
    fn ok(&self, token: &str, args: &[&str]) -> String {
        let (ok, out, err) = baton_cli_as(&self.server, Some(token), args);
        assert!(ok, "baton {args:?} failed: {err}");
        out
    }

    fn apply(&self, world: &World, file: &str, yaml: &str) {
        let path = world.write(file, yaml);
        self.ok(&self.root, &["apply", "-f", path.to_str().expect("utf-8")]);
    }

    /// Every one of `devices` runs `revision` of app, healthy.
    fn settled(&self, revision: u64, devices: usize) -> Option<()> {
        let (ok, out, _) = baton_cli_as(&self.server, Some(&self.root), &["describe", "workload", "app", "-o", "json"]);
        let w: WorkloadView = ok.then(|| serde_json::from_str(&out).ok()).flatten()?;
        (w.devices.len() == devices
            && w.devices.iter().all(|d| {
                d.reported
                    .as_ref()
                    .is_some_and(|r| r.revision == revision && r.phase == Phase::Running && r.health == Health::Healthy)
            }))
        .then_some(())
    }

    fn rollout(&self) -> RolloutView {
        serde_json::from_str(&self.ok(&self.root, &["rollout", "status", "app", "-o", "json"])).expect("rollout JSON")
    }
}

/// Logs the page in with `token` (from wherever it is); `remember`: for
/// every tab of the browser.
fn log_in(b: &Browser, base: &str, token: &str, remember: bool) {
    b.goto(&format!("{base}/ui/"));
    // The page settles on one of the two once it has asked who it is.
    let logged_in = wait_until(T, || {
        if b.find("#logout:not([hidden])").is_some() {
            Some(true)
        } else {
            b.find("#token").map(|_| false)
        }
    })
    .expect("neither the login form nor a logged-in page");
    if logged_in {
        b.click_on("#logout", T);
    }
    b.fill("#token", token, T);
    if remember {
        b.click_on("#remember", T);
    }
    b.click_on("#login", T);
}

#[test]
fn operators_see_and_steer_the_fleet_in_a_browser() {
    let world = World::new();
    let controller = Controller::start(&world, None, &["--api-auth"]);
    let server = controller.server_url();
    let base = server.trim_end_matches('/').to_string();
    let root = std::fs::read_to_string(world.path().join("controller/admin.token")).expect("first admin token");
    let api = Api { server: server.clone(), root: root.trim().to_string() };
    let root = api.root.clone();
    let token = |tenant: Option<&str>, role: &str, name: &str| {
        let mut args = vec!["apitoken", "create", "--role", role, "--name", name];
        if let Some(t) = tenant {
            args.splice(0..0, ["--tenant", t]);
        }
        api.ok(&root, &args).trim().to_string()
    };
    let (reader, acme) = (token(None, "read-only", "reader"), token(Some("acme"), "admin", "acme-ops"));

    // Six simulated devices (labelled sim=yes) and a real one, moved to tenant acme.
    let _sim = start_simulator(&world, "fleet", 6, &controller.broker_url(), &["--label", "sim=yes"]);
    give_busybox(&world, "pi-real", "busybox:dash");
    let _agent = start_agent(&world, "pi-real", &controller.broker_url(), &[]);
    wait_for("seven devices", T, || {
        let (ok, out, _) = baton_cli_as(&server, Some(&root), &["get", "devices", "-o", "json"]);
        let list: Vec<DeviceView> = ok.then(|| serde_json::from_str(&out).ok()).flatten()?;
        (list.len() == 7).then_some(())
    });
    api.ok(&root, &["device", "assign", "pi-real", "acme"]);
    let talker = world.write(
        "talker.yaml",
        "name: talker\nimage: busybox:dash\ncommand: [/bin/sh, -c, 'i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.3; done']\n",
    );
    api.ok(&acme, &["apply", "-f", talker.to_str().expect("path")]);
    api.apply(&world, "app.yaml", &app("1"));
    wait_for("revision 1 on the simulated fleet", Duration::from_secs(60), || api.settled(1, 6));

    let b = Browser::start(&world, "dashboard", 1280, 900);

    // A wrong token is refused, on the page.
    log_in(&b, &base, "baton-api.wrong", false);
    b.wait_text(".login .error", T, |t| !t.is_empty());
    assert!(b.find("#status-cards").is_none(), "a refused token saw the overview");

    // The fleet admin: seven devices at a glance.
    log_in(&b, &base, &root, true);
    b.wait_text("#who", T, |t| t.contains("admin"));
    let cards = b.wait_text("#status-cards", T, |t| t.contains("7\ndevices"));
    assert!(cards.contains("online"), "{cards}");
    b.checkpoint("overview");

    // The device list: counted, searchable on the server.
    b.goto(&format!("{base}/ui/#/devices"));
    b.wait_text("#count", T, |t| t == "1–7 of 7");
    b.fill("#search", "pi-re", T);
    b.wait_text("#count", T, |t| t == "1–1 of 1");
    assert_eq!(b.find_all("#devices tr[data-device]").len(), 1);
    b.checkpoint("devices");

    // A device page: set a label from the page; the controller has it.
    b.click_on("#devices a[href='#/devices/pi-real']", T);
    b.fill("#add-label input", "site=lyon", T);
    b.click_on("#add-label button", T);
    b.wait_text("#labels", T, |t| t.contains("site=lyon"));
    let d: DeviceView =
        serde_json::from_str(&api.ok(&root, &["describe", "device", "pi-real", "-o", "json"])).expect("JSON");
    assert_eq!(d.operator_labels.get("site").map(String::as_str), Some("lyon"));

    // Its container's log, tailed and followed in the page.
    b.wait_text("#device-workloads", T, |t| t.contains("talker") && t.contains("Running"));
    b.click_on("button[data-logs='talker']", T);
    let first = b.wait_text("#log", T, |t| t.contains("tick "));
    let last_tick = |t: &str| t.lines().filter_map(|l| l.split("tick ").nth(1)?.trim().parse::<u64>().ok()).max();
    let n = last_tick(&first).expect("a tick");
    b.wait_text("#log", T, |t| last_tick(t).is_some_and(|m| m >= n + 3));
    b.checkpoint("device");

    // A rollout watched live: the page is not reloaded (the mark stays),
    // its wave moves, and it is paused and resumed from the page.
    b.goto(&format!("{base}/ui/#/workloads/app"));
    b.wait_text("#rollout-panel", T, |t| t.contains("No rollout yet"));
    b.script("window.__stay = 'same page'; return null;");
    api.apply(&world, "app.yaml", &app("2"));
    b.wait_text("#rollout", T, |t| t.contains("1 → 2") && t.contains("progressing"));
    b.click_on("#rollout button[data-action='pause']", T);
    b.click_on("#confirm-ok", T);
    b.wait_text("#rollout", T, |t| t.contains("paused"));
    b.checkpoint("rollout-paused");
    assert_eq!(api.rollout().state, State::Paused);
    // Held (a bounded look at something that must not happen).
    let released = api.rollout().counts.released;
    for _ in 0..10 {
        assert_eq!(api.rollout().counts.released, released, "a paused rollout released a wave");
        std::thread::sleep(Duration::from_millis(100));
    }
    b.click_on("#rollout button[data-action='resume']", T);
    b.click_on("#confirm-ok", T);
    let mut waves = Vec::new();
    let done = wait_until(Duration::from_secs(90), || {
        let r = b.find("#rollout")?;
        if let Some(w) = b.attribute(&r, "data-wave") {
            if waves.last() != Some(&w) {
                waves.push(w);
            }
        }
        (b.attribute(&r, "data-state").as_deref() == Some("succeeded")).then_some(())
    });
    assert!(done.is_some(), "the page never showed the rollout succeed; waves seen {waves:?}: {}", b.body_text());
    assert!(waves.len() >= 2, "the page showed too few waves: {waves:?}");
    assert_eq!(b.script("return window.__stay || null;"), serde_json::json!("same page"), "the page was reloaded");
    b.wait_text("#wave", T, |t| t == "wave 3 of 3");
    b.checkpoint("rollout-done");
    assert_eq!(api.rollout().state, State::Succeeded);

    // The event feed moves by itself.
    b.goto(&format!("{base}/ui/#/events"));
    b.wait("#events li", T);
    api.apply(&world, "app.yaml", &app("3"));
    b.wait_text("#events", T, |t| t.contains("revision 3"));
    b.checkpoint("events");
    b.fill("#event-filter", "pi-real", T);
    b.wait_text("#events", T, |t| !t.contains("revision 3") && t.contains("pi-real"));

    // Many tabs at once (the token remembered for them): a browser gives a
    // host six connections, and no page may hold one for itself (the tenth
    // tab loads like the first).
    for i in 0..9 {
        b.new_tab();
        let page = if i % 2 == 0 { "#/workloads/app" } else { "#/events" };
        b.goto(&format!("{base}/ui/{page}"));
        b.wait(if i % 2 == 0 { "#rollout" } else { "#events li" }, T);
    }
    b.goto(&format!("{base}/ui/#/devices"));
    b.wait_text("#count", T, |t| t == "1–7 of 7");

    // Phone-sized: the navigation is there and nothing scrolls sideways.
    b.goto(&format!("{base}/ui/#/"));
    b.wait("#status-cards", T);
    b.set_window_size(390, 844);
    b.checkpoint("phone");
    let narrow = b.script(
        "return { nav: !!document.querySelector('#nav a[href=\"#/devices\"]').offsetParent, \
         fits: document.documentElement.scrollWidth <= document.documentElement.clientWidth + 1 };",
    );
    assert_eq!((&narrow["nav"], &narrow["fits"]), (&true.into(), &true.into()), "on a phone: {narrow}");
    b.set_window_size(1280, 900);

    // A read-only token: the same pages, no buttons that change anything.
    log_in(&b, &base, &reader, false);
    b.wait_text("#who", T, |t| t.contains("read-only"));
    b.goto(&format!("{base}/ui/#/workloads/app"));
    b.wait("#rollout", T);
    b.wait("#revisions", T);
    assert!(b.find("#rollout button[data-action]").is_none(), "a read-only token was offered rollout actions");
    b.goto(&format!("{base}/ui/#/devices/pi-real"));
    b.wait("#labels", T);
    assert!(b.find("#add-label").is_none(), "a read-only token was offered label editing");

    // A tenant's token: its own device only.
    log_in(&b, &base, &acme, false);
    b.wait_text("#who", T, |t| t.contains("tenant acme"));
    b.goto(&format!("{base}/ui/#/devices"));
    b.wait_text("#count", T, |t| t == "1–1 of 1");
    let rows = b.wait_text("#devices", T, |t| t.contains("pi-real"));
    assert!(!rows.contains("fleet-"), "a tenant saw another tenant's devices: {rows}");
    b.goto(&format!("{base}/ui/#/"));
    b.wait_text("#status-cards", T, |t| t.starts_with("1\ndevices"));
}
