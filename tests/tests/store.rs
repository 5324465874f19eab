//! The store's contract, run on both databases it lives in: SQLite (a file)
//! and PostgreSQL (Debian's server, started by the test on a free loopback
//! port). Every query the controller makes goes through one of these calls;
//! each is checked for the same answers on both.

use std::collections::BTreeMap;

use baton_controller::fleet::Device;
use baton_controller::rollout::{Rollout, Strategy};
use baton_controller::store::{ApiToken, Store, StoreAt, StoredToken, StoredWebhook, REVISION_HISTORY};
use baton_controller::upgrade::AgentRollout;
use baton_controller::view::{Event, Role};
use baton_controller::workload::Manifest;
use baton_protocol::spec::WorkloadSpec;
use baton_protocol::DeviceId;
use baton_tests::{stored_device, wait_for, World};

fn event(tenant: &str, subject: &str, at_ms: u64) -> Event {
    Event {
        at_ms,
        kind: "k".into(),
        name: "k.m".into(),
        subject: subject.into(),
        message: format!("at {at_ms}"),
        tenant: tenant.into(),
    }
}

fn spec(name: &str, revision: u64) -> WorkloadSpec {
    WorkloadSpec { name: name.into(), revision, image: format!("img:{revision}"), ..Default::default() }
}

/// Everything the controller stores, written, read back, changed and
/// deleted; `reopen` gives the same database through a new connection.
fn contract(at: &StoreAt) {
    let s = Store::open_at(at).expect("open a new store");
    let migrated = s.schema_version().expect("the store answers");
    assert!(migrated > 0);

    // Devices: one at a time, many at once, read back by id and all.
    s.save_device(&stored_device("b", 2)).expect("the store answers");
    assert_eq!(s.save_devices([&stored_device("a", 5), &stored_device("b", 7)]).expect("the store answers"), 2);
    let all = s.load_devices().expect("the store answers");
    assert_eq!(
        all.iter().map(|(id, d)| (id.to_string(), d.last_seen)).collect::<Vec<_>>(),
        [("a".into(), 5), ("b".into(), 7)]
    );
    assert_eq!(
        s.load_device(&DeviceId::new("a").expect("a device id")).expect("the store answers"),
        Some(stored_device("a", 5))
    );
    assert_eq!(s.load_device(&DeviceId::new("zz").expect("a device id")).expect("the store answers"), None);

    // Events: newest `limit`, oldest first, by subject and tenant.
    for (i, (tenant, subject)) in
        [("acme", "web"), ("globex", "db"), ("", "first-admin"), ("acme", "web")].iter().enumerate()
    {
        s.add_event(&event(tenant, subject, i as u64 + 10)).expect("the store answers");
    }
    let subjects = |subject, tenant, limit| -> Vec<(String, u64)> {
        s.load_events(subject, tenant, limit)
            .expect("the store answers")
            .into_iter()
            .map(|e| (e.subject, e.at_ms))
            .collect()
    };
    assert_eq!(subjects(None, None, 10).len(), 4);
    assert_eq!(subjects(None, None, 2), [("first-admin".into(), 12), ("web".into(), 13)]);
    assert_eq!(subjects(Some("web"), Some("acme"), 10), [("web".into(), 10), ("web".into(), 13)]);
    assert_eq!(subjects(None, Some("globex"), 10), [("db".into(), 11)]);

    // Desired documents, with and without the signed payload.
    s.save_desired("a", 3, &[spec("web", 1)], b"signed-a").expect("the store answers");
    s.save_desired("a", 4, &[spec("web", 2)], b"signed-a4").expect("the store answers");
    s.save_desired("b", 1, &[], b"").expect("the store answers");
    let desired = s.load_desired().expect("the store answers");
    assert_eq!(desired["a"].generation, 4);
    assert_eq!(desired["a"].workloads, [spec("web", 2)]);
    assert_eq!(desired["a"].payload.as_deref(), Some(&b"signed-a4"[..]));
    assert_eq!(desired["b"].payload.as_deref(), Some(&b""[..]));

    // Credentials and revocation.
    s.save_credentials("a", &[1, 2, 3], 5).expect("the store answers");
    s.save_credentials("b", &[4], 5).expect("the store answers");
    s.save_credentials("a", &[9], 6).expect("the store answers");
    assert_eq!(
        s.load_credentials().expect("the store answers"),
        BTreeMap::from([("a".into(), vec![9]), ("b".into(), vec![4])])
    );
    assert!(s.revoke("b", 7).expect("the store answers"));
    assert!(!s.revoke("b", 8).expect("the store answers"), "revoked twice: nothing left the second time");
    assert_eq!(s.load_credentials().expect("the store answers").len(), 1);

    // Workloads, revisions beyond the history kept, rollouts.
    let manifest: Manifest =
        serde_json::from_value(serde_json::json!({"name": "web", "image": "img"})).expect("a manifest");
    for rev in 1..=(REVISION_HISTORY as u64 + 3) {
        s.save_revision(&spec("web", rev), &[1], rev).expect("the store answers");
        s.save_workload("acme", &manifest, &spec("web", rev), 1, rev).expect("the store answers");
    }
    s.save_revision(&spec("web", 4), &[1], 99).expect("the store answers"); // the same revision again replaces it
    let mut rollout = Rollout::new("web", 1, 13, vec!["a".into(), "b".into()], Strategy::default(), 50);
    s.save_rollout(&rollout).expect("the store answers");
    rollout.wave = 1;
    s.save_rollout(&rollout).expect("the store answers");
    let workloads = s.load_workloads().expect("the store answers");
    assert_eq!(workloads.len(), 1);
    let w = &workloads[0];
    assert_eq!((w.tenant.as_str(), w.latest, w.stable), ("acme", 13, 1));
    let kept: Vec<u64> = w.revisions.keys().copied().collect();
    let mut want: Vec<u64> = (4..=13).collect();
    want.insert(0, 1);
    assert_eq!(kept, want, "the newest {REVISION_HISTORY} and the one kept by name");
    assert_eq!(w.rollout.as_ref().map(|r| r.wave), Some(1));
    assert!(s.delete_workload("web").expect("the store answers"));
    assert!(!s.delete_workload("web").expect("the store answers"));
    assert!(s.load_workloads().expect("the store answers").is_empty());

    // Secrets: versions, history trimmed, listed without values.
    for v in 1..=12u64 {
        s.put_secret("acme", "db-password", v, format!("sealed-{v}").as_bytes(), 100 + v).expect("the store answers");
    }
    s.put_secret("globex", "api-key", 1, b"k", 5).expect("the store answers");
    let latest = s.secret_latest("db-password").expect("the store answers").expect("the store answers");
    assert_eq!((latest.version, latest.updated_at, latest.tenant.as_str()), (12, 112, "acme"));
    assert_eq!(s.secret("db-password", 12).expect("the store answers").as_deref(), Some(&b"sealed-12"[..]));
    assert_eq!(s.secret("db-password", 2).expect("the store answers"), None, "older than the history kept");
    assert_eq!(
        s.list_secrets().expect("the store answers").iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
        ["api-key", "db-password"]
    );
    assert!(s.delete_secret("api-key").expect("the store answers"));
    assert_eq!(s.secret_latest("api-key").expect("the store answers"), None);

    // Join tokens: uses spent to zero and no further.
    let t = StoredToken {
        id: "t1".into(),
        expires_at: 9,
        uses_left: 2,
        labels: [("site".to_string(), "lab".to_string())].into(),
        created_at: 1,
        tenant: "acme".into(),
    };
    s.save_token(&t, b"h").expect("the store answers");
    assert_eq!(s.token("t1").expect("the store answers"), Some((t.clone(), b"h".to_vec())));
    assert!(s.spend_token("t1").expect("the store answers"));
    assert!(s.spend_token("t1").expect("the store answers"));
    assert!(!s.spend_token("t1").expect("the store answers"), "no use left");
    assert_eq!(s.tokens().expect("the store answers")[0].uses_left, 0);
    assert!(s.delete_token("t1").expect("the store answers"));
    assert_eq!(s.token("t1").expect("the store answers"), None);

    // API tokens and webhooks.
    let a = ApiToken { id: "a1".into(), role: Role::Admin, name: "n".into(), created_at: 1, tenant: None };
    let b = ApiToken {
        id: "a2".into(),
        role: Role::ReadOnly,
        name: "m".into(),
        created_at: 2,
        tenant: Some("acme".into()),
    };
    s.save_api_token(&a, b"ha").expect("the store answers");
    s.save_api_token(&b, b"hb").expect("the store answers");
    assert_eq!(s.api_tokens().expect("the store answers"), [(a, b"ha".to_vec()), (b, b"hb".to_vec())]);
    assert!(s.delete_api_token("a1").expect("the store answers"));
    let hook = StoredWebhook {
        id: "w1".into(),
        tenant: String::new(),
        url: "http://127.0.0.1:9/h".into(),
        events: vec!["device.offline".into(), "rollout.*".into()],
        secret: vec![0, 1, 2, 255],
        created_at: 4,
    };
    s.save_webhook(&hook).expect("the store answers");
    assert_eq!(s.webhooks().expect("the store answers"), [hook]);
    assert!(s.delete_webhook("w1").expect("the store answers"));
    assert!(s.webhooks().expect("the store answers").is_empty());

    // Agent builds, read in pieces; agent upgrades.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let r1 = s.add_release("1.0.0", "aarch64", &[1; 32], &data, 5).expect("the store answers");
    let r2 = s.add_release("1.1.0", "arm", &[2; 32], &data[..10], 6).expect("the store answers");
    assert_eq!((r1.seq, r1.size, r2.seq), (1, 200_000, 2));
    assert_eq!(
        s.add_release("1.0.0", "aarch64", &[1; 32], &data, 7).expect("the store answers"),
        r1,
        "the same bytes again"
    );
    assert!(s.add_release("1.0.0", "aarch64", &[9; 32], b"other", 8).is_err(), "other bytes under a published name");
    let (total, piece) =
        s.release_chunk(&[1; 32], 150_000, 65_536).expect("the store answers").expect("the store answers");
    assert_eq!((total, piece.as_slice()), (200_000, &data[150_000..]));
    let (_, piece) = s.release_chunk(&[1; 32], 7, 5).expect("the store answers").expect("the store answers");
    assert_eq!(piece, &data[7..12]);
    assert_eq!(s.release_chunk(&[1; 32], 300_000, 10).expect("the store answers").expect("the store answers").1, b"");
    assert_eq!(s.release_chunk(&[7; 32], 0, 10).expect("the store answers"), None);
    assert_eq!(s.remove_release("1.1.0", None).expect("the store answers"), 1);
    assert_eq!(s.releases().expect("the store answers"), [r1]);
    let upgrade = AgentRollout {
        id: 3,
        version: "1.0.0".into(),
        selector: BTreeMap::new(),
        before: [("a".to_string(), "0.9.0".to_string())].into(),
        rollout: Rollout::new("agent", 0, 1, vec!["a".into()], Strategy::default(), 9),
    };
    s.save_agent_rollout(&upgrade).expect("the store answers");
    assert_eq!(s.load_agent_rollout().expect("the store answers"), Some(upgrade));

    // A batch dropped without commit leaves nothing; a committed one all.
    {
        let batch = s.batch().expect("the store answers");
        s.save_device(&stored_device("gone", 1)).expect("the store answers");
        s.save_devices([&stored_device("gone2", 1)]).expect("the store answers"); // its own transaction, inside the batch
        drop(batch);
    }
    assert!(s.load_device(&DeviceId::new("gone").expect("a device id")).expect("the store answers").is_none());
    assert!(s.load_device(&DeviceId::new("gone2").expect("a device id")).expect("the store answers").is_none());
    let batch = s.batch().expect("the store answers");
    s.save_device(&stored_device("kept", 1)).expect("the store answers");
    s.add_event(&event("", "kept", 99)).expect("the store answers");
    batch.commit().expect("the store answers");
    drop(s);

    // Another connection sees it all; migrations are not applied twice.
    let s = Store::open_at(at).expect("reopen");
    assert_eq!(s.schema_version().expect("the store answers"), migrated);
    assert!(s.load_device(&DeviceId::new("kept").expect("a device id")).expect("the store answers").is_some());
    assert_eq!(s.load_events(Some("kept"), None, 10).expect("the store answers").len(), 1);
    assert_eq!(s.load_desired().expect("the store answers")["a"].generation, 4);
}

/// A flush bigger than one statement's rows, with an id given twice (the last one wins).
fn big_flush(at: &StoreAt) {
    let s = Store::open_at(at).expect("open a new store");
    let many: Vec<Device> =
        (0..1203).map(|i| stored_device(&format!("m{i:04}"), i)).chain([stored_device("m0007", 999)]).collect();
    assert_eq!(s.save_devices(many.iter()).expect("a big flush"), 1203);
    let loaded = s.load_devices().expect("the store answers");
    assert_eq!(loaded.len(), 1203);
    let seven = loaded.iter().find(|(id, _)| id.as_str() == "m0007").expect("m0007");
    assert_eq!(seven.1.last_seen, 999);
    assert_eq!(loaded.last().map(|(_, d)| d.last_seen), Some(1202));
}

#[test]
fn the_store_keeps_the_same_things_in_sqlite() {
    let world = World::new();
    contract(&StoreAt::Sqlite(world.path().join("baton.db")));
    big_flush(&StoreAt::Sqlite(world.path().join("flush.db")));
}

#[test]
fn the_store_keeps_the_same_things_in_postgresql() {
    let world = World::new();
    contract(&StoreAt::Postgres(world.postgres().database("contract")));
    big_flush(&StoreAt::Postgres(world.postgres().database("flush")));
}

#[test]
fn a_second_controller_on_one_postgresql_store_is_refused_while_the_first_holds_it() {
    let world = World::new();
    let at = StoreAt::Postgres(world.postgres().database("held"));
    let first = Store::open_at(&at).expect("the first controller's store");
    let e = Store::open_at(&at).err().expect("a second store on the same database is refused").to_string();
    assert!(e.contains("another controller holds the store"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
    drop(first);
    // The server ends the first session's backend, and frees its lock, a
    // moment after the client hangs up: poll, do not expect it at once.
    wait_for("free again once the first is gone", std::time::Duration::from_secs(10), || Store::open_at(&at).ok());
}

#[test]
fn a_postgresql_store_survives_the_server_restarting_between_writes() {
    let world = World::new();
    let at = StoreAt::Postgres(world.postgres().database("restarted"));
    let s = Store::open_at(&at).expect("open");
    s.save_device(&stored_device("a", 1)).expect("the store answers");
    let pg = world.postgres();
    pg.stop();
    let e = s.save_device(&stored_device("b", 1)).unwrap_err().to_string();
    assert!(e.contains("PostgreSQL"), "a write while the server is down says where it failed: {e}");
    pg.start_again();
    s.save_device(&stored_device("c", 1)).expect("the next write reconnects");
    let ids: Vec<String> =
        s.load_devices().expect("the store answers").into_iter().map(|(id, _)| id.to_string()).collect();
    assert_eq!(ids, ["a", "c"], "nothing written twice, nothing lost that was acknowledged");
    // A transaction the server went away in does not land in part.
    let batch = s.batch().expect("the store answers");
    s.save_device(&stored_device("d", 1)).expect("the store answers");
    pg.stop();
    pg.start_again();
    assert!(s.save_device(&stored_device("e", 1)).is_err(), "the rest of a lost transaction fails");
    assert!(batch.commit().is_err());
    s.save_device(&stored_device("f", 1)).expect("after the lost transaction ends, writes go on");
    let ids: Vec<String> =
        s.load_devices().expect("the store answers").into_iter().map(|(id, _)| id.to_string()).collect();
    assert_eq!(ids, ["a", "c", "f"]);
}

/// `sslmode=require` (here libpq's `verify-full`): the store speaks TLS to
/// PostgreSQL, the server's certificate checked against `sslrootcert`, and
/// refused without it (the web PKI does not vouch for a private CA);
/// `sslrootcert` without `sslmode=require` is refused, not ignored.
#[test]
fn a_postgresql_store_over_tls_checks_the_server_certificate() {
    let world = World::new();
    let pg = world.postgres();
    let ca = pg.enable_tls();
    let url = pg.database("tls");
    let at = StoreAt::Postgres(format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display()));
    let s = Store::open_at(&at).expect("a store over TLS");
    s.save_device(&stored_device("a", 1)).expect("a write over TLS");
    let sessions = pg.psql(
        "SELECT string_agg(s.ssl::text, ',') FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'baton-controller'",
    );
    assert_eq!(sessions, "true", "the controller's session is not over TLS");
    drop(s);

    let e = Store::open_at(&StoreAt::Postgres(format!("{url}?sslmode=require"))).err().expect("refused").to_string();
    assert!(e.contains("UnknownIssuer"), "{e}");
    let e = Store::open_at(&StoreAt::Postgres(format!("{url}?sslrootcert={}", ca.display())))
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("sslrootcert, sslcert and sslkey are used with sslmode=require"), "{e}");
}

/// A PostgreSQL that authenticates clients by certificate (pg_hba `cert`):
/// the controller presents `sslcert`/`sslkey` and gets in; without them it
/// is refused by the server, and says so.
#[test]
fn a_postgresql_store_authenticates_with_a_client_certificate() {
    let world = World::new();
    let pg = world.postgres();
    let ca = pg.enable_tls();
    let url = pg.database("certs");
    let (cert, key) = pg.require_client_certificates();
    let tls = format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display());
    let e = Store::open_at(&StoreAt::Postgres(tls.clone())).err().expect("refused without a certificate").to_string();
    assert!(e.contains("requires a valid client certificate"), "{e}");
    let at = StoreAt::Postgres(format!("{tls}&sslcert={}&sslkey={}", cert.display(), key.display()));
    let s = Store::open_at(&at).expect("a store with a client certificate");
    s.save_device(&stored_device("a", 1)).expect("a write");
    let sessions = pg.psql(
        "SELECT string_agg(s.client_dn, ',') FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'baton-controller'",
    );
    assert_eq!(sessions, "/CN=baton", "the controller's session did not present its certificate");
}
