//! Autoscaling (`autoscale:` on `replicas` workloads): a simulated fleet
//! under a load wave (`baton-agent simulate --load`: the workload's demand
//! shared by its running instances, as their CPU and as the load they say
//! they have), and one real device whose container uses CPU under its cgroup
//! and writes its own load to `/run/baton/load`.

use std::time::Duration;

use baton_controller::view::{Event, WorkloadView};
use baton_tests::*;

/// (from, to) of each autoscaling decision, oldest first.
fn decisions(controller: &Controller, name: &str) -> Vec<(u32, u32)> {
    let events: Vec<Event> =
        get_json(controller.http, &format!("/api/v1/events?subject={name}&limit=1000")).expect("events");
    let mut out: Vec<(u64, u32, u32)> = events
        .into_iter()
        .filter(|e| e.name == "workload.autoscaled")
        .filter_map(|e| {
            let rest = e.message.strip_prefix("autoscaled from ")?;
            let (from, rest) = rest.split_once(" to ")?;
            let to = rest.split_whitespace().next()?;
            Some((e.at_ms, from.parse().ok()?, to.parse().ok()?))
        })
        .collect();
    out.sort();
    out.into_iter().map(|(_, f, t)| (f, t)).collect()
}

/// Instances placed and running healthy.
fn running(w: &WorkloadView) -> usize {
    w.devices
        .iter()
        .filter(|d| {
            d.reported.as_ref().is_some_and(|r| {
                r.phase == baton_protocol::Phase::Running && r.health == baton_protocol::Health::Healthy
            })
        })
        .count()
}

#[test]
fn a_simulated_fleet_follows_a_load_wave_up_and_back_down_without_flapping() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let n = 30;
    // `web`: 0.6 CPU of demand, 6 CPUs from 30 s to 75 s into the run, then
    // 0.6 again. `queue`: a steady load of 3 (what its instances say), for 2 each.
    let _sim = start_simulator(
        &world,
        "as",
        n,
        &controller.broker_url(),
        &["--heartbeat-interval", "1", "--load", "web=0:600,30:6000,75:600", "--load", "queue=0:3000"],
    );
    wait_for("simulated devices", Duration::from_secs(60), || (controller.devices().len() == n).then_some(()));

    // Bad policies are refused at apply, naming the field.
    for (bad, field) in [
        ("autoscale: {min: 2, max: 8, cpu_percent: 50}", "autoscale.cpu_percent"),
        ("resources: {cpu: 1000m}\nautoscale: {min: 3, max: 2, cpu_percent: 50}", "autoscale.max"),
        ("resources: {cpu: 1000m}\nautoscale: {min: 1, max: 2}", "autoscale"),
        ("autoscale: {min: 1, max: 2, load: 0}", "autoscale.load"),
    ] {
        let path = world.write("bad.yaml", &format!("name: bad\nimage: 127.0.0.1:9/web:1\nreplicas: 1\n{bad}\n"));
        let (ok, _, err) = baton_cli(&server, &["apply", "-f", path.to_str().expect("utf-8")]);
        assert!(!ok && err.contains(field), "{bad}: {err}");
    }

    let manifest = "name: web\nimage: 127.0.0.1:9/web:1\nresources: {cpu: 1000m}\nreplicas: 2\n\
                    autoscale: {min: 2, max: 12, cpu_percent: 50, window: 15, cooldown: 3}\n---\n\
                    name: queue\nimage: 127.0.0.1:9/queue:1\nreplicas: 1\n\
                    autoscale: {min: 1, max: 5, load: 2, window: 15, cooldown: 3}\n";
    apply_yaml(&server, &world, "apps.yaml", manifest);
    // `baton scale` is refused on an autoscaled workload, with what to do instead.
    let (ok, _, err) = baton_cli(&server, &["scale", "web", "--replicas", "5"]);
    assert!(!ok && err.contains("autoscaled between 2 and 12"), "{err}");

    // The custom load: 3 over one instance is 1.5× the target of 2 → 2 instances, 1.5 each.
    let q = wait_for("queue scaled to 2 on its own load", Duration::from_secs(40), || {
        describe_workload(&server, "queue").filter(|w| w.replicas == Some(2) && running(w) == 2)
    });
    let a = q.autoscale.expect("autoscale state in describe");
    assert_eq!((a.min, a.max, a.current), (1, 5, 2), "{a:?}");

    // Up with the wave: 6 CPUs at 50 % of 1 CPU each is 12, reached in
    // bounded steps (×2 or +4 at a time), never past max.
    let mut most = 0;
    let w = wait_for("web scaled up to 12", Duration::from_secs(90), || {
        let w = describe_workload(&server, "web")?;
        most = most.max(w.replicas.unwrap_or(0));
        // Every instance reports its load (new ones from their first heartbeat).
        (w.replicas == Some(12) && running(&w) == 12 && w.devices.iter().all(|d| d.load.is_some())).then_some(w)
    });
    assert!(most <= 12, "past max: {most}");
    assert_eq!(w.devices.len(), 12);
    // 6 CPUs over 12 instances: half a CPU each, the target, once every
    // instance has been rated over a heartbeat interval of its own.
    wait_for("every instance at half a CPU", Duration::from_secs(20), || {
        let w = describe_workload(&server, "web")?;
        let cpu: Vec<u32> = w.devices.iter().filter_map(|d| d.load.as_ref()?.cpu_milli).collect();
        (cpu.len() == 12 && cpu.iter().all(|m| (450..=550).contains(m))).then_some(())
    });

    // Down again once the wave has passed and a whole window (15 s) said so.
    let w = wait_for("web back down to 2", Duration::from_secs(90), || {
        describe_workload(&server, "web").filter(|w| w.replicas == Some(2) && w.devices.len() == 2)
    });
    let a = w.autoscale.expect("autoscale state");
    let last = a.last_decision.expect("a last decision");
    assert_eq!(last.to, 2, "{last:?}");
    assert!(last.reason.contains("cpu"), "{last:?}");

    // No flapping: up in a few steps, then down in a few — never down then up again.
    let ds = decisions(&controller, "web");
    assert!(ds.len() <= 6, "too many decisions: {ds:?}");
    let turn = ds.iter().position(|(f, t)| t < f).expect("a scale-down");
    assert!(ds[..turn].iter().all(|(f, t)| t > f), "{ds:?}");
    assert!(ds[turn..].iter().all(|(f, t)| t < f), "{ds:?}");
    assert!(ds.iter().all(|(_, t)| (2..=12).contains(t)), "{ds:?}");
    // `queue` settled once and stayed.
    assert_eq!(decisions(&controller, "queue"), [(1, 2)]);
    // Described for people, too.
    let (ok, out, _) = baton_cli(&server, &["describe", "workload", "web"]);
    assert!(ok && out.contains("Autoscale:     2 to 12, now 2") && out.contains("CPU"), "{out}");
}

#[test]
fn a_real_container_reports_its_cpu_and_its_own_load() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    give_busybox(&world, "pi-load", "busybox:load");
    let _agent = start_agent(&world, "pi-load", &controller.broker_url(), &[]);
    wait_for("the device", Duration::from_secs(20), || controller.device("pi-load"));

    // Half a CPU busy (its limit), and a load of 5 said in /run/baton/load
    // for a target of 1: the autoscaler wants 3 (its max), of which this
    // one device holds one.
    let script = "mkdir -p /run/baton; echo 5 > /run/baton/load; while :; do :; done";
    apply_yaml(
        &server,
        &world,
        "busy.yaml",
        &format!(
            "name: busy\nimage: busybox:load\ncommand: [/bin/sh, -c, '{script}']\nresources: {{cpu: 500m}}\n\
             replicas: 1\nautoscale: {{min: 1, max: 3, load: 1, cpu_percent: 50, cooldown: 1}}\n"
        ),
    );
    let load = wait_for("the container's load in a heartbeat", Duration::from_secs(60), || {
        let w = describe_workload(&server, "busy")?;
        w.devices.first()?.load.clone().filter(|l| l.cpu_milli.is_some() && l.load_milli.is_some())
    });
    assert_eq!(load.load_milli, Some(5000), "{load:?}");
    let cpu = load.cpu_milli.unwrap_or(0);
    assert!((300..=600).contains(&cpu), "a busy loop under a 500m limit uses about 500m: {cpu}");
    assert!(load.memory_bytes > 0, "{load:?}");

    let w = wait_for("autoscaled to 3", Duration::from_secs(30), || {
        describe_workload(&server, "busy").filter(|w| w.replicas == Some(3))
    });
    assert_eq!(w.unplaced, 2, "one device holds one replica: {w:?}");
    let reason = w.autoscale.and_then(|a| a.last_decision).map(|d| d.reason).unwrap_or_default();
    assert!(reason.contains("load 5.00 per instance (target 1.00)"), "{reason}");

    // The workload stops saying anything: no load in the heartbeat, and the
    // count rests on CPU alone (still busy: it stays).
    let (ok, _, err) =
        baton_cli(&server, &["exec", "--device", "pi-load", "busy", "--", "/bin/sh", "-c", "rm /run/baton/load"]);
    assert!(ok, "{err}");
    wait_for("no load said", Duration::from_secs(30), || {
        let w = describe_workload(&server, "busy")?;
        w.devices.first()?.load.as_ref().filter(|l| l.load_milli.is_none() && l.cpu_milli.is_some()).map(|_| ())
    });
}

#[test]
fn a_disruption_budget_paces_rollouts_and_scale_downs_per_site() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let n = 12;
    // Device n is on site a, b or c (n mod 3); `web` has no load at all.
    let _sim = start_simulator(
        &world,
        "db",
        n,
        &controller.broker_url(),
        &["--heartbeat-interval", "1", "--label-cycle", "site=a,b,c", "--load", "web=0:0"],
    );
    wait_for("simulated devices", Duration::from_secs(60), || (controller.devices().len() == n).then_some(()));
    let site = |device: &str| {
        ["a", "b", "c"][device.rsplit('-').next().and_then(|i| i.parse::<usize>().ok()).unwrap_or(0) % 3]
    };

    // A rollout of one wave over all 12, with one device per site at a time.
    let agent = |version: u32| {
        format!(
            "name: agentd\nimage: 127.0.0.1:9/agentd:{version}\nrollout: {{waves: [100%], min_ready: 1}}\n\
             disruption: {{max_unavailable: 1, per: site}}\n"
        )
    };
    apply_yaml(&server, &world, "agentd.yaml", &agent(1));
    wait_for("revision 1 everywhere", Duration::from_secs(60), || settled(&server, "agentd", 1, n));
    apply_yaml(&server, &world, "agentd.yaml", &agent(2));
    let mut most_per_site = 0;
    let mut waves = 0;
    let done = wait_for("the rollout of revision 2", Duration::from_secs(120), || {
        let w = describe_workload(&server, "agentd")?;
        let r = w.rollout.clone()?;
        waves = waves.max(r.waves);
        // Given revision 2 and not yet running it healthy, per site.
        let mut updating = std::collections::BTreeMap::new();
        for d in w.devices.iter().filter(|d| d.desired_revision == 2) {
            let ready =
                d.reported.as_ref().is_some_and(|s| s.revision == 2 && s.health == baton_protocol::Health::Healthy);
            if !ready {
                *updating.entry(site(&d.device)).or_insert(0) += 1;
            }
        }
        most_per_site = most_per_site.max(updating.values().copied().max().unwrap_or(0));
        (!r.state.active()).then_some(r)
    });
    assert_eq!(done.state, baton_controller::rollout::State::Succeeded, "{done:?}");
    assert_eq!(waves, 4, "12 devices, 3 sites, one per site a wave");
    assert!(most_per_site <= 1, "{most_per_site} devices of one site updating at once");

    // A scale-down from 9 to the minimum of 3 (no load): at most one instance
    // (the smallest site allowance) per decision.
    apply_yaml(
        &server,
        &world,
        "web.yaml",
        "name: web\nimage: 127.0.0.1:9/web:1\nresources: {cpu: 500m}\nreplicas: 9\nplacement: {spread_by: site}\n\
         autoscale: {min: 3, max: 9, cpu_percent: 50, window: 2, cooldown: 1}\n\
         disruption: {max_unavailable: 1, per: site}\n",
    );
    wait_for("web down to 3", Duration::from_secs(90), || {
        describe_workload(&server, "web").filter(|w| w.replicas == Some(3) && w.devices.len() == 3)
    });
    let ds = decisions(&controller, "web");
    assert_eq!(ds.len(), 6, "{ds:?}");
    assert!(ds.iter().all(|(f, t)| f - t == 1), "one at a time: {ds:?}");
    // Spread by site all along: one instance on each at the end.
    let w = describe_workload(&server, "web").expect("web");
    let sites: std::collections::BTreeSet<&str> = w.devices.iter().map(|d| site(&d.device)).collect();
    assert_eq!(sites.len(), 3, "{:?}", w.devices.iter().map(|d| &d.device).collect::<Vec<_>>());
}
