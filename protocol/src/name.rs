//! Names operators give things, under one rule written once: lowercase
//! letters, digits and `-`, not starting with `-`, so a name is safe in MQTT
//! topics, URLs, file names, container ids and shells. Workloads and secrets
//! take up to 63 characters (a DNS label), tenants up to 32 (they prefix
//! other names). `WorkloadName` and `TenantName` are checked once, when made.

use std::fmt;

/// What a name names: its length limit and how errors call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Workload,
    Secret,
    Tenant,
}

impl NameKind {
    pub fn max_len(self) -> usize {
        match self {
            NameKind::Workload | NameKind::Secret => 63,
            NameKind::Tenant => 32,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NameKind::Workload => "workload",
            NameKind::Secret => "secret",
            NameKind::Tenant => "tenant",
        }
    }
}

/// A name that breaks the rule, and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} name {name:?}: use 1-{max} characters of a-z 0-9 - (not starting with -)", kind = .kind.as_str(), max = .kind.max_len())]
pub struct InvalidName {
    pub kind: NameKind,
    pub name: String,
}

/// Checks `name` against the rule for `kind`.
pub fn check_name(kind: NameKind, name: &str) -> Result<(), InvalidName> {
    let ok = !name.is_empty()
        && name.len() <= kind.max_len()
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(InvalidName { kind, name: name.to_string() })
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $t:ident, $kind:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $t(String);

        impl $t {
            pub fn new(name: impl Into<String>) -> Result<Self, InvalidName> {
                let name = name.into();
                check_name($kind, &name)?;
                Ok(Self(name))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $t {
            type Error = InvalidName;
            fn try_from(s: String) -> Result<Self, InvalidName> {
                Self::new(s)
            }
        }

        impl From<$t> for String {
            fn from(n: $t) -> String {
                n.0
            }
        }

        impl std::ops::Deref for $t {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A workload's name, unique across the fleet (devices, topics and
    /// revisions are keyed by it).
    WorkloadName,
    NameKind::Workload
);
name_type!(
    /// A tenant's name.
    TenantName,
    NameKind::Tenant
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_three_lengths() {
        for (kind, name, ok) in [
            (NameKind::Workload, "web-1", true),
            (NameKind::Workload, "0", true),
            (NameKind::Workload, "", false),
            (NameKind::Workload, "-web", false),
            (NameKind::Workload, "Web", false),
            (NameKind::Workload, "web_1", false),
            (NameKind::Workload, "wéb", false),
            (NameKind::Workload, &"a".repeat(63), true),
            (NameKind::Workload, &"a".repeat(64), false),
            (NameKind::Secret, &"a".repeat(63), true),
            (NameKind::Tenant, &"a".repeat(32), true),
            (NameKind::Tenant, &"a".repeat(33), false),
        ] {
            assert_eq!(check_name(kind, name).is_ok(), ok, "{kind:?} {name:?}");
        }
        let e = check_name(NameKind::Tenant, "Acme").unwrap_err();
        assert_eq!(e.to_string(), "tenant name \"Acme\": use 1-32 characters of a-z 0-9 - (not starting with -)");
    }

    #[test]
    fn newtypes_check_when_made_and_when_decoded() {
        assert_eq!(WorkloadName::new("web").map(String::from), Ok("web".to_string()));
        assert!(TenantName::new("a b").is_err());
        let bytes = postcard::to_allocvec("Web").unwrap();
        assert!(postcard::from_bytes::<WorkloadName>(&bytes).is_err(), "decoding checks the rule too");
        let web = WorkloadName::new("web").unwrap();
        assert_eq!(
            postcard::to_allocvec(&web).unwrap(),
            postcard::to_allocvec("web").unwrap(),
            "a plain string on the wire"
        );
    }
}
