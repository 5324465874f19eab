//! Tenants: every device, workload, secret, join token and API token belongs
//! to one, and an operator acting for a tenant sees and changes only what is
//! its own. Pure: no I/O; the API turns a request into a `Scope`, the
//! controller filters with it.
//!
//! Names of workloads and secrets stay unique across the controller (devices
//! and topics are keyed by them), so a tenant cannot take a name another
//! tenant uses; the refusal says only that the name is taken.

use baton_protocol::{check_name, InvalidName, NameKind};

/// The tenant everything belongs to unless said otherwise (and everything
/// stored before tenants existed).
pub const DEFAULT: &str = "default";

/// Header by which a fleet-wide operator acts for one tenant (the CLI's `--tenant`).
pub const HEADER: &str = "baton-tenant";

/// What a request may see and change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every tenant: a fleet-wide token (or no `--api-auth`) without a tenant
    /// named. Creates in the default tenant.
    All,
    /// One tenant's objects only; creates in it.
    Tenant(String),
}

impl Scope {
    /// Whether an object of `tenant` is visible (and, for admins, changeable).
    pub fn sees(&self, tenant: &str) -> bool {
        match self {
            Self::All => true,
            Self::Tenant(t) => t == tenant,
        }
    }

    /// The one tenant this scope is narrowed to; `None`: every tenant.
    /// Whether this scope sees something owned by `owner` (`None`:
    /// fleet-wide, which only a fleet-wide scope sees): API tokens, webhooks.
    pub fn sees_owned(&self, owner: Option<&str>) -> bool {
        match self {
            Self::All => true,
            Self::Tenant(t) => owner == Some(t.as_str()),
        }
    }

    pub fn tenant(&self) -> Option<&str> {
        match self {
            Self::All => None,
            Self::Tenant(t) => Some(t),
        }
    }

    /// The tenant new objects go to.
    pub fn owner(&self) -> &str {
        match self {
            Self::All => DEFAULT,
            Self::Tenant(t) => t,
        }
    }

    /// The scope of a request: a token's own tenant (`None`: fleet-wide),
    /// narrowed by the tenant the request names. A tenant's token naming
    /// another tenant is refused.
    pub fn of(token_tenant: Option<&str>, named: Option<&str>) -> Result<Self, ScopeError> {
        if let Some(n) = named {
            validate(n)?;
        }
        match (token_tenant, named) {
            (None, None) => Ok(Self::All),
            (None, Some(n)) => Ok(Self::Tenant(n.into())),
            (Some(t), None) => Ok(Self::Tenant(t.into())),
            (Some(t), Some(n)) if t == n => Ok(Self::Tenant(t.into())),
            (Some(t), Some(n)) => Err(ScopeError::OtherTenant { token: t.into(), named: n.into() }),
        }
    }
}

/// Tenant names follow the one naming rule (`baton_protocol::name`).
pub fn validate(name: &str) -> Result<(), InvalidName> {
    check_name(NameKind::Tenant, name)
}

/// Why a request's scope cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error(transparent)]
    Name(#[from] InvalidName),
    #[error("this token belongs to tenant {token}; it cannot act for tenant {named}")]
    OtherTenant { token: String, named: String },
}

/// For serde defaults of stored documents from before tenants.
pub fn default_tenant() -> String {
    DEFAULT.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_wide_token_sees_everything_and_creates_in_the_default_tenant() {
        let s = Scope::of(None, None).unwrap();
        assert!(s.sees("acme") && s.sees(DEFAULT));
        assert_eq!(s.owner(), DEFAULT);
    }

    #[test]
    fn naming_a_tenant_narrows_a_fleet_wide_token() {
        let s = Scope::of(None, Some("acme")).unwrap();
        assert!(s.sees("acme"));
        assert!(!s.sees("globex") && !s.sees(DEFAULT));
        assert_eq!(s.owner(), "acme");
    }

    #[test]
    fn a_tenant_token_stays_in_its_tenant() {
        assert_eq!(Scope::of(Some("acme"), None).unwrap(), Scope::Tenant("acme".into()));
        assert_eq!(Scope::of(Some("acme"), Some("acme")).unwrap(), Scope::Tenant("acme".into()));
        let e = Scope::of(Some("acme"), Some("globex")).unwrap_err().to_string();
        assert!(e.contains("acme") && e.contains("globex"), "{e}");
    }

    #[test]
    fn tenant_names_are_checked() {
        for bad in ["", "-x", "Acme", "a/b", "a b", &"x".repeat(33)] {
            assert!(validate(bad).is_err(), "{bad:?}");
            assert!(Scope::of(None, Some(bad)).is_err(), "{bad:?}");
        }
        for good in ["acme", "a", "team-7", DEFAULT] {
            assert!(validate(good).is_ok(), "{good:?}");
        }
    }
}
