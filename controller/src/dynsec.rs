//! Device identities on Mosquitto, kept by the controller through
//! Mosquitto's dynamic-security plugin (`--broker-dynsec`): a join token
//! becomes a `join:<id>` client that may only ask to enroll, an enrolled
//! device (or one given credentials) a client whose username and client id
//! are its id, with a role of its own that lets it publish and subscribe on
//! its own topics only; revocation disables it (which cuts its connections)
//! and deletes it. Mosquitto 2.0's plugin has no `%u` patterns in ACLs, so
//! each device gets its own role.
//!
//! Pure: every function returns the JSON a command batch is; ingest
//! publishes it on [`TOPIC`] and logs what the broker answers on [`RESPONSES`].

use baton_protocol::TopicKind;
use serde_json::{json, Value};

pub const TOPIC: &str = "$CONTROL/dynamic-security/v1";
pub const RESPONSES: &str = "$CONTROL/dynamic-security/v1/response";

const CONTROLLER_ROLE: &str = "baton-controller";
const JOIN_ROLE: &str = "baton-join";

fn role_of(device: &str) -> String {
    format!("baton-device-{device}")
}

fn acl(kind: &str, topic: &str) -> Value {
    json!({"acltype": kind, "topic": topic, "priority": 0, "allow": true})
}

fn batch(commands: Vec<Value>) -> Vec<u8> {
    json!({ "commands": commands }).to_string().into_bytes()
}

/// The roles the controller relies on, and its own (the account it connects
/// with, which `mosquitto_ctrl dynsec init` made an admin of the plugin).
/// Sent on every connect; "already exists" answers are expected.
pub fn setup(controller_user: &str) -> Vec<u8> {
    let all = "baton/v1/#";
    batch(vec![
        json!({"command": "createRole", "rolename": CONTROLLER_ROLE, "acls": [
            acl("publishClientSend", all), acl("publishClientReceive", all), acl("subscribePattern", all),
        ]}),
        json!({"command": "addClientRole", "username": controller_user, "rolename": CONTROLLER_ROLE, "priority": 0}),
        json!({"command": "createRole", "rolename": JOIN_ROLE, "acls": [
            acl("publishClientSend", &TopicKind::Enroll.filter_all_devices()),
            acl("subscribePattern", &TopicKind::EnrollRes.filter_all_devices()),
        ]}),
    ])
}

/// What a device may do: publish its own upstream topics, subscribe to its
/// own `desired`, `cmd` and `release/res` (exact topics, no wildcards).
fn device_acls(device: &str) -> Vec<Value> {
    let topic = |k: TopicKind| format!("baton/v1/dev/{device}/{}", k.suffix());
    let mut acls: Vec<Value> = [
        TopicKind::Presence,
        TopicKind::Inventory,
        TopicKind::Heartbeat,
        TopicKind::Report,
        TopicKind::CmdRes,
        TopicKind::Release,
    ]
    .into_iter()
    .map(|k| acl("publishClientSend", &topic(k)))
    .collect();
    acls.extend(
        [TopicKind::Desired, TopicKind::Cmd, TopicKind::ReleaseRes]
            .into_iter()
            .map(|k| acl("subscribeLiteral", &topic(k))),
    );
    acls
}

/// (Re)creates a device's client with this password; an existing one is
/// removed first, which cuts its connections (new credentials replace old).
pub fn device(device: &str, password: &str) -> Vec<u8> {
    let role = role_of(device);
    batch(vec![
        json!({"command": "disableClient", "username": device}),
        json!({"command": "deleteClient", "username": device}),
        json!({"command": "deleteRole", "rolename": role}),
        json!({"command": "createRole", "rolename": role, "acls": device_acls(device)}),
        json!({"command": "createClient", "username": device, "password": password, "clientid": device,
               "roles": [{"rolename": role, "priority": 0}]}),
    ])
}

/// Revocation: the device is disconnected and can no longer log in.
pub fn remove_device(device: &str) -> Vec<u8> {
    batch(vec![
        json!({"command": "disableClient", "username": device}),
        json!({"command": "deleteClient", "username": device}),
        json!({"command": "deleteRole", "rolename": role_of(device)}),
    ])
}

/// The account a device joins with: username `join:<token id>`, the token's secret.
pub fn join_token(id: &str, secret: &str) -> Vec<u8> {
    batch(vec![
        json!({"command": "createClient", "username": baton_protocol::token::join_username(id), "password": secret,
                      "roles": [{"rolename": JOIN_ROLE, "priority": 0}]}),
    ])
}

/// A token deleted, used up or expired: its account goes.
pub fn remove_join(id: &str) -> Vec<u8> {
    let username = baton_protocol::token::join_username(id);
    batch(vec![
        json!({"command": "disableClient", "username": username}),
        json!({"command": "deleteClient", "username": username}),
    ])
}

/// The failures in a response batch worth a warning: idempotent steps
/// (creating what exists, removing what is gone) are expected to fail.
pub fn failures(response: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(response) else {
        return vec![format!("unreadable dynamic-security response ({} bytes)", response.len())];
    };
    let expected = |command: &str, error: &str| {
        let e = error.to_ascii_lowercase();
        (command.starts_with("create") || command == "addClientRole") && e.contains("already")
            || (command.starts_with("delete") || command == "disableClient") && e.contains("not found")
    };
    v["responses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let command = r["command"].as_str().unwrap_or("?");
            let error = r["error"].as_str()?;
            (!expected(command, error)).then(|| format!("{command}: {error}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands(bytes: &[u8]) -> Vec<Value> {
        let v: Value = serde_json::from_slice(bytes).unwrap();
        v["commands"].as_array().unwrap().clone()
    }

    #[test]
    fn a_device_gets_its_own_topics_and_client_id_only() {
        let c = commands(&device("pi-a", "pw"));
        let create = c.iter().find(|c| c["command"] == "createClient").unwrap();
        assert_eq!((create["username"].as_str(), create["clientid"].as_str()), (Some("pi-a"), Some("pi-a")));
        assert_eq!(create["roles"][0]["rolename"], "baton-device-pi-a");
        let role = c.iter().find(|c| c["command"] == "createRole").unwrap();
        let acls = role["acls"].as_array().unwrap();
        assert!(acls.iter().all(|a| a["topic"].as_str().unwrap().starts_with("baton/v1/dev/pi-a/")));
        assert!(acls.iter().all(|a| !a["topic"].as_str().unwrap().contains(['+', '#'])), "wildcards: {acls:?}");
        let subs: Vec<&str> =
            acls.iter().filter(|a| a["acltype"] == "subscribeLiteral").map(|a| a["topic"].as_str().unwrap()).collect();
        assert_eq!(subs, ["baton/v1/dev/pi-a/desired", "baton/v1/dev/pi-a/cmd", "baton/v1/dev/pi-a/release/res"]);
        // The old client goes first (its connections with it), then the new one is made.
        let order: Vec<&str> = c.iter().map(|c| c["command"].as_str().unwrap()).collect();
        assert_eq!(order, ["disableClient", "deleteClient", "deleteRole", "createRole", "createClient"]);
    }

    #[test]
    fn joining_and_revoking_accounts() {
        let j = commands(&join_token("abc", "s3cret"));
        assert_eq!((j[0]["username"].as_str(), j[0]["password"].as_str()), (Some("join:abc"), Some("s3cret")));
        assert_eq!(j[0]["roles"][0]["rolename"], JOIN_ROLE);
        let r = commands(&remove_device("pi-a"));
        assert_eq!(r[0]["command"], "disableClient");
        let s = commands(&setup("baton-controller"));
        assert!(s.iter().any(|c| c["command"] == "addClientRole" && c["username"] == "baton-controller"));
    }

    #[test]
    fn only_unexpected_failures_are_reported() {
        let response = br#"{"responses":[
            {"command":"createRole","error":"Role already exists"},
            {"command":"deleteClient","error":"Client not found"},
            {"command":"createClient"},
            {"command":"addClientRole","error":"Not authorized"}]}"#;
        assert_eq!(failures(response), ["addClientRole: Not authorized"]);
        assert_eq!(failures(b"garbage").len(), 1);
    }
}
