//! Credential and reference formats both sides spell: the join token an
//! operator copies to a device (`baton1.<id>.<secret>.<controller key>`),
//! the MQTT username of a join session (`join:<token id>`), and the
//! reference a secret file holds in a stored revision
//! (`baton-secret:<name>:<version>`, sealed per device before it travels).

use std::fmt;

use crate::crypto;

/// A join token, as `baton token create` prints it once.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// 16 hex digits: names the token in the controller's store.
    pub id: String,
    /// 64 hex digits: the controller keeps only its SHA-256.
    pub secret: String,
    /// The controller's signing key: the joining device pins it.
    pub controller_key: [u8; 32],
}

/// Text that is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a Baton join token (expected baton1.<id>.<secret>.<key>, from `baton token create`)")]
pub struct InvalidJoinToken;

/// The secret stays out of logs and error messages.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({}, secret hidden)", self.id)
    }
}

impl fmt::Display for JoinToken {
    /// The token as the operator copies it (secret included).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "baton1.{}.{}.{}", self.id, self.secret, crypto::hex(&self.controller_key))
    }
}

impl std::str::FromStr for JoinToken {
    type Err = InvalidJoinToken;

    fn from_str(s: &str) -> Result<Self, InvalidJoinToken> {
        let mut parts = s.trim().split('.');
        let (Some("baton1"), Some(id), Some(secret), Some(key), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(InvalidJoinToken);
        };
        let hex = |t: &str, n: usize| t.len() == n && t.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(id, 16) || !hex(secret, 64) {
            return Err(InvalidJoinToken);
        }
        let controller_key = crypto::parse_key(key).map_err(|_| InvalidJoinToken)?;
        Ok(JoinToken { id: id.into(), secret: secret.into(), controller_key })
    }
}

/// The MQTT username of a session joining with token `id`.
pub fn join_username(id: &str) -> String {
    format!("join:{id}")
}

/// The token id of a join session's username, if it is one.
pub fn join_token_id(username: &str) -> Option<&str> {
    username.strip_prefix("join:")
}

/// Which version of which secret a secret file holds in a stored revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub name: String,
    /// 0 until the controller pins the current version at apply.
    pub version: u64,
}

impl SecretRef {
    pub fn to_bytes(&self) -> Vec<u8> {
        format!("baton-secret:{}:{}", self.name, self.version).into_bytes()
    }

    /// None when `contents` is not a reference.
    pub fn parse(contents: &[u8]) -> Option<SecretRef> {
        let text = std::str::from_utf8(contents).ok()?.strip_prefix("baton-secret:")?;
        let (name, version) = text.rsplit_once(':')?;
        Some(SecretRef { name: name.to_string(), version: version.parse().ok()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_strictly_and_print_back() {
        let key = crypto::hex(&[7; 32]);
        let good = format!("baton1.{}.{}.{key}", "ab".repeat(8), "cd".repeat(32));
        let t: JoinToken = good.parse().unwrap();
        assert_eq!((t.id.len(), t.secret.len(), t.controller_key), (16, 64, [7; 32]));
        assert_eq!(t.to_string(), good);
        assert!(!format!("{t:?}").contains(&t.secret), "Debug shows no secret");
        for bad in [
            String::new(),
            good.replace("baton1", "baton2"),
            format!("{good}.x"),
            format!("baton1.{}.{}.{key}", "zz".repeat(8), "cd".repeat(32)),
            format!("baton1.{}.{}.{key}", "ab".repeat(8), "cd".repeat(31)),
            format!("baton1.{}.{}.abc", "ab".repeat(8), "cd".repeat(32)),
        ] {
            assert_eq!(bad.parse::<JoinToken>(), Err(InvalidJoinToken), "{bad}");
        }
    }

    #[test]
    fn join_usernames_and_secret_references_round_trip() {
        assert_eq!(join_token_id(&join_username("abc")), Some("abc"));
        assert_eq!(join_token_id("pi-1"), None);
        let r = SecretRef { name: "db-pw".into(), version: 3 };
        assert_eq!(r.to_bytes(), b"baton-secret:db-pw:3");
        assert_eq!(SecretRef::parse(&r.to_bytes()), Some(r));
        for bad in [&b"plain file"[..], b"baton-secret:x", b"baton-secret:x:v", b"\xff"] {
            assert_eq!(SecretRef::parse(bad), None);
        }
    }
}
