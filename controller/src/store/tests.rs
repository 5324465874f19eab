//! The store against a real SQLite file: migrations, round trips, refusals
//! (the same queries on PostgreSQL: `tests/tests/store.rs`).

use super::*;
use crate::fleet::Device;
use crate::view::Event;
use baton_protocol::DeviceId;
use baton_protocol::{Presence, PresenceState};

fn device(id: &str) -> Device {
    Device {
        id: id.into(),
        first_seen: 1,
        last_seen: 2,
        presence: Presence {
            state: PresenceState::Online,
            agent_version: "0.1.0".into(),
            boot_id: "b".into(),
            started_at: 3,
        },
        inventory: None,
        heartbeat: None,
        operator_labels: [("k".to_string(), "v".to_string())].into(),
        report: None,
        tenant: "acme".into(),
        offline_since: None,
        refusal: None,
        clock_offset_ms: None,
        history: Default::default(),
        connected_at: 0,
    }
}

#[test]
fn a_backup_opens_as_a_store_with_everything_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("baton.db")).unwrap();
    store.save_device(&device("a")).unwrap();
    let bytes = store.backup().unwrap();
    store.save_device(&device("b")).unwrap();
    let restored = dir.path().join("restored.db");
    std::fs::write(&restored, bytes).unwrap();
    let back = Store::open(&restored).unwrap();
    let ids: Vec<String> = back.load_devices().unwrap().into_iter().map(|(id, _)| id.to_string()).collect();
    assert_eq!(ids, ["a"], "the backup is the store as it was when taken");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("backup"))
        .collect();
    assert!(left.is_empty(), "a temporary copy was left behind: {left:?}");
}

#[test]
fn migrates_once_and_round_trips_devices_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.db");
    {
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len());
        s.save_device(&device("a")).unwrap();
        let mut b = device("b");
        s.save_devices([&b]).unwrap();
        b.last_seen = 99;
        s.save_device(&b).unwrap();
    }
    let s = Store::open(&path).unwrap();
    let all = s.load_devices().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].1.last_seen, 99);
    assert_eq!(s.load_device(&DeviceId::new("a").unwrap()).unwrap(), Some(device("a")));
}

#[test]
fn a_database_from_before_tenants_puts_everything_in_the_default_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.db");
    {
        let conn = Connection::open(&path).unwrap();
        for sql in &MIGRATIONS[..7] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 7).unwrap();
        let mut doc = serde_json::to_value(device("old")).unwrap();
        doc.as_object_mut().unwrap().remove("tenant");
        conn.execute("INSERT INTO devices VALUES ('old', ?1, 0)", [doc.to_string()]).unwrap();
        let spec = WorkloadSpec { name: "web".into(), revision: 1, ..Default::default() };
        let manifest = serde_json::json!({"name": "web", "image": "x"});
        conn.execute(
            "INSERT INTO workloads (name, manifest, spec, updated_at) VALUES ('web', ?1, ?2, 0)",
            [
                serde_json::from_value::<Manifest>(manifest).map(|m| serde_json::to_string(&m).unwrap()).unwrap(),
                serde_json::to_string(&spec).unwrap(),
            ],
        )
        .unwrap();
        conn.execute("INSERT INTO secrets VALUES ('s', 1, x'00', 0)", []).unwrap();
        conn.execute("INSERT INTO tokens VALUES ('t', x'00', 9, 1, '{}', 0)", []).unwrap();
        conn.execute("INSERT INTO api_tokens VALUES ('a', x'00', 'admin', 'first', 0)", []).unwrap();
    }
    let s = Store::open(&path).unwrap();
    assert_eq!(s.load_devices().unwrap()[0].1.tenant, crate::tenant::DEFAULT);
    assert_eq!(s.load_workloads().unwrap()[0].tenant, crate::tenant::DEFAULT);
    assert_eq!(s.list_secrets().unwrap()[0].tenant, crate::tenant::DEFAULT);
    assert_eq!(s.tokens().unwrap()[0].tenant, crate::tenant::DEFAULT);
    // The admin token from before is fleet-wide.
    assert_eq!(s.api_tokens().unwrap()[0].0.tenant, None);
}

#[test]
fn tenants_round_trip_and_filter_events() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("baton.db")).unwrap();
    s.put_secret("acme", "db-password", 1, b"sealed", 5).unwrap();
    assert_eq!(s.list_secrets().unwrap()[0].tenant, "acme");
    let t = StoredToken {
        id: "t1".into(),
        expires_at: 9,
        uses_left: 1,
        labels: BTreeMap::new(),
        created_at: 1,
        tenant: "acme".into(),
    };
    s.save_token(&t, b"h").unwrap();
    assert_eq!(s.token("t1").unwrap().unwrap().0, t);
    let a = ApiToken {
        id: "a1".into(),
        role: crate::view::Role::Admin,
        name: "n".into(),
        created_at: 1,
        tenant: Some("acme".into()),
    };
    s.save_api_token(&a, b"h").unwrap();
    assert_eq!(s.api_tokens().unwrap()[0].0, a);
    for (tenant, subject) in [("acme", "web"), ("globex", "db"), ("", "first-admin")] {
        let e = Event {
            at_ms: 1,
            kind: "k".into(),
            name: "k.m".into(),
            subject: subject.into(),
            message: "m".into(),
            tenant: tenant.into(),
        };
        s.add_event(&e).unwrap();
    }
    let subjects =
        |tenant| -> Vec<String> { s.load_events(None, tenant, 10).unwrap().into_iter().map(|e| e.subject).collect() };
    assert_eq!(subjects(Some("acme")), ["web"]);
    assert_eq!(subjects(Some("globex")), ["db"]);
    assert_eq!(subjects(None), ["web", "db", "first-admin"]);
}

#[test]
fn refuses_a_database_from_a_newer_controller() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.db");
    Store::open(&path).unwrap().db.sqlite_conn().unwrap().pragma_update(None, "user_version", 999).unwrap();
    let e = Store::open(&path).err().unwrap().to_string();
    assert!(e.contains("schema version 999"), "{e}");
}

#[test]
fn a_corrupt_row_is_an_error_naming_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("baton.db")).unwrap();
    s.db.execute("INSERT INTO devices VALUES ('x', '{not json', 0)", vec![]).unwrap();
    let e = s.load_devices().unwrap_err().to_string();
    assert!(e.contains("stored device x"), "{e}");
}
