//! Who may talk to the controller: device credentials (MQTT passwords,
//! revocation), join tokens and enrollment, operator API tokens and their
//! roles; the Mosquitto dynamic-security batches that mirror them.

use std::collections::BTreeMap;

use baton_protocol::{crypto, encode, validate_label, DeviceId, Message, PresenceState};

use crate::commands::Outgoing;
use crate::fleet::{Delivery, FleetEvent, Millis};
use crate::tenant::Scope;
use crate::view::{ApiTokenView, JoinTokenView, Role};

use super::{lock, parse_id, Controller, OpError};

/// Compares every byte: no early exit on the first difference.
pub(super) fn same_hash(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Controller {
    /// Whether `password` is the one issued to device `id` (its SHA-256 is kept).
    pub(crate) fn password_matches(&self, id: &DeviceId, password: &[u8]) -> bool {
        let hash = crate::keys::sha256(password);
        lock(&self.credentials).get(id.as_str()).is_some_and(|stored| same_hash(stored, &hash))
    }

    /// `baton device credentials ID`: a new MQTT password for a device (the
    /// old one stops working, and its connections are cut). Returned once;
    /// only its hash is kept.
    /// A device not known yet is registered (offline) in the caller's tenant;
    /// another tenant's device is "not found".
    pub fn issue_credentials(&self, id: &str, now: Millis, scope: &Scope) -> Result<String, OpError> {
        let device = parse_id(id)?;
        let (tenant, registered) = {
            let mut fleet = lock(&self.fleet);
            match fleet.get(&device) {
                Some(_) => (Self::visible_device(&fleet, &device, scope)?.tenant.clone(), None),
                None => {
                    fleet.register(&device, Vec::new(), BTreeMap::new(), scope.owner(), now);
                    (scope.owner().to_string(), fleet.get(&device).cloned())
                }
            }
        };
        if let Some(d) = registered {
            self.persist(&d);
        }
        let password = self.new_credentials(&device, &tenant, now)?;
        if let Some(g) = self.broker.get() {
            g.disconnect(id);
        }
        Ok(password)
    }

    /// Stores a new password for a device of `tenant` and returns it.
    pub(super) fn new_credentials(&self, id: &DeviceId, tenant: &str, now: Millis) -> Result<String, OpError> {
        let (_, password, hash) = crate::keys::new_secret().map_err(|e| OpError::Invalid(e.to_string()))?;
        let store = lock(&self.store);
        store.save_credentials(id.as_str(), &hash, now)?;
        self.event(&store, tenant, "device.credentials", id.as_str(), "credentials issued".into(), now);
        drop(store);
        lock(&self.credentials).insert(id.as_str().to_owned(), hash);
        self.dynsec_send(|| crate::dynsec::device(id.as_str(), &password));
        Ok(password)
    }

    /// `baton apitoken create`: an operator token (`admin` or `read-only`),
    /// `baton-api.<id>.<secret>`, shown once.
    /// The token acts for the caller's tenant; a fleet-wide caller acting
    /// for no tenant makes a fleet-wide token.
    pub fn create_api_token(
        &self,
        role: Role,
        name: &str,
        now: Millis,
        scope: &Scope,
    ) -> Result<(String, ApiTokenView), OpError> {
        let (id, secret, hash) = crate::keys::new_secret().map_err(|e| OpError::Invalid(e.to_string()))?;
        let tenant = scope.tenant().map(str::to_string);
        let t = crate::store::ApiToken { id: id.clone(), role, name: name.into(), created_at: now, tenant };
        let store = lock(&self.store);
        store.save_api_token(&t, &hash)?;
        let tenant = t.tenant.as_deref().unwrap_or_default();
        self.event(&store, tenant, "apitoken.created", &id, format!("{role} token {name:?} created"), now);
        drop(store);
        lock(&self.api_tokens).push((t.clone(), hash));
        Ok((format!("baton-api.{id}.{secret}"), t.into()))
    }

    /// A tenant's tokens, or (fleet-wide) every token.
    pub fn api_token_list(&self, scope: &Scope) -> Vec<ApiTokenView> {
        let tokens = lock(&self.api_tokens);
        tokens.iter().filter(|(t, _)| scope.sees_owned(t.tenant.as_deref())).map(|(t, _)| t.clone().into()).collect()
    }

    pub fn delete_api_token(&self, id: &str, now: Millis, scope: &Scope) -> Result<(), OpError> {
        let not_found = || OpError::NotFound(format!("API token {id} not found"));
        let tenant = lock(&self.api_tokens)
            .iter()
            .find(|(t, _)| t.id == id && scope.sees_owned(t.tenant.as_deref()))
            .map(|(t, _)| t.tenant.clone().unwrap_or_default())
            .ok_or_else(not_found)?;
        let store = lock(&self.store);
        if !store.delete_api_token(id)? {
            return Err(not_found());
        }
        self.event(&store, &tenant, "apitoken.revoked", id, "revoked".into(), now);
        drop(store);
        lock(&self.api_tokens).retain(|(t, _)| t.id != id);
        Ok(())
    }

    /// The role and tenant (`None`: fleet-wide) of a bearer token, or why it is not accepted.
    /// The token's role, tenant, and who it is (`token NAME (ID)`, for audit events).
    pub fn authorize(&self, bearer: Option<&str>) -> Result<(Role, Option<String>, String), String> {
        let token = bearer.ok_or("this controller requires an API token: pass --token or set BATON_TOKEN")?;
        let mut parts = token.trim().split('.');
        let (Some("baton-api"), Some(id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("malformed API token".into());
        };
        let hash = crate::keys::sha256(secret.as_bytes());
        lock(&self.api_tokens)
            .iter()
            .find(|(t, h)| t.id == id && same_hash(h, &hash))
            .map(|(t, _)| (t.role, t.tenant.clone(), format!("token {} ({})", t.name, t.id)))
            .ok_or_else(|| "unknown or revoked API token".into())
    }

    /// With `--api-auth` and no admin token yet: makes one and writes it to
    /// `path` (0600), so the operator on this machine can start.
    pub fn ensure_admin_token(&self, path: &std::path::Path, now: Millis) -> anyhow::Result<()> {
        if lock(&self.api_tokens).iter().any(|(t, _)| t.role == Role::Admin && t.tenant.is_none()) {
            return Ok(());
        }
        let (token, _) =
            self.create_api_token(Role::Admin, "first admin", now, &Scope::All).map_err(|e| anyhow::anyhow!("{e}"))?;
        crate::keys::write_private(path, format!("{token}\n").as_bytes())?;
        tracing::warn!(path = %path.display(), "created the first admin API token (BATON_TOKEN=$(cat FILE))");
        Ok(())
    }

    /// `baton token create`: a join token. Returned once as
    /// `baton1.<id>.<secret>.<controller signing key>`; only the secret's hash is kept.
    pub fn create_token(
        &self,
        ttl_s: u64,
        uses: u32,
        labels: BTreeMap<String, String>,
        now: Millis,
        scope: &Scope,
    ) -> Result<(String, JoinTokenView), OpError> {
        if uses == 0 || ttl_s == 0 {
            return Err(OpError::Invalid("a token needs at least one use and a lifetime".into()));
        }
        for (k, v) in &labels {
            validate_label(k, v).map_err(|e| OpError::Invalid(e.to_string()))?;
        }
        let (id, secret, hash) = crate::keys::new_secret().map_err(|e| OpError::Invalid(e.to_string()))?;
        let t = crate::store::StoredToken {
            id: id.clone(),
            expires_at: now.saturating_add(ttl_s.saturating_mul(1000)),
            uses_left: uses,
            labels,
            created_at: now,
            tenant: scope.owner().into(),
        };
        let store = lock(&self.store);
        store.save_token(&t, &hash)?;
        self.event(
            &store,
            &t.tenant,
            "token.created",
            &id,
            format!("created: {uses} use(s), expires in {ttl_s} s"),
            now,
        );
        drop(store);
        self.dynsec_send(|| crate::dynsec::join_token(&id, &secret));
        let token = baton_protocol::token::JoinToken { id, secret, controller_key: self.keys.signing.public() };
        Ok((token.to_string(), t.into()))
    }

    pub fn tokens(&self, scope: &Scope) -> Result<Vec<JoinTokenView>, OpError> {
        Ok(lock(&self.store).tokens()?.into_iter().filter(|t| scope.sees(&t.tenant)).map(Into::into).collect())
    }

    pub fn delete_token(&self, id: &str, now: Millis, scope: &Scope) -> Result<(), OpError> {
        let store = lock(&self.store);
        let not_found = || OpError::NotFound(format!("token {id} not found"));
        let (t, _) = store.token(id)?.filter(|(t, _)| scope.sees(&t.tenant)).ok_or_else(not_found)?;
        if !store.delete_token(id)? {
            return Err(not_found());
        }
        self.event(&store, &t.tenant, "token.deleted", id, "deleted".into(), now);
        self.dynsec_send(|| crate::dynsec::remove_join(id));
        Ok(())
    }

    /// Queues a dynamic-security batch when Mosquitto keeps the accounts.
    pub(super) fn dynsec_send(&self, batch: impl FnOnce() -> Vec<u8>) {
        if self.dynsec {
            let _ = self.outbox.send(Outgoing::Dynsec(batch()));
        }
    }

    /// With `--broker-dynsec`, every 30 s: join accounts of tokens used up or
    /// expired are removed (not at the join itself: the joining session must
    /// still receive its answer).
    pub(super) fn sweep_join_accounts(&self, now: Millis) {
        if !self.dynsec {
            return;
        }
        let mut swept = lock(&self.swept_tokens);
        if now.saturating_sub(swept.1) < 30_000 {
            return;
        }
        swept.1 = now;
        let tokens = match lock(&self.store).tokens() {
            Ok(t) => t,
            Err(e) => return tracing::warn!(error = %e, "cannot list join tokens"),
        };
        for t in tokens.iter().filter(|t| t.uses_left == 0 || now >= t.expires_at) {
            if swept.0.insert(t.id.clone()) {
                let _ = self.outbox.send(Outgoing::Dynsec(crate::dynsec::remove_join(&t.id)));
            }
        }
    }

    /// A token that admits a join right now: known, this secret, unexpired, uses left.
    pub(crate) fn valid_token(
        &self,
        id: &str,
        secret: &[u8],
        now: Millis,
    ) -> Result<crate::store::StoredToken, String> {
        let (t, hash) = lock(&self.store).token(id).map_err(|e| e.to_string())?.ok_or("unknown token")?;
        if !same_hash(&hash, &crate::keys::sha256(secret)) {
            return Err("wrong token secret".into());
        }
        if now >= t.expires_at {
            return Err("token expired".into());
        }
        if t.uses_left == 0 {
            return Err("token used up".into());
        }
        Ok(t)
    }

    /// A device joining with a token (`enroll` topic): spends one use, issues
    /// its MQTT password sealed to the key it sent, registers it with the
    /// token's labels and that key. Every refusal is answered with its reason.
    pub fn enroll(
        &self,
        id: &DeviceId,
        req: &baton_protocol::EnrollRequest,
        now: Millis,
    ) -> baton_protocol::EnrollResponse {
        let refuse = |why: String| {
            tracing::warn!(device = %id, %why, "enrollment refused");
            baton_protocol::EnrollResponse { sealed_password: Vec::new(), error: Some(why) }
        };
        let token = match self.valid_token(&req.token_id, req.token_secret.as_bytes(), now) {
            Ok(t) => t,
            Err(why) => return refuse(why),
        };
        let Ok(key) = <[u8; 32]>::try_from(req.sealing_key.as_slice()) else {
            return refuse("the request carries no 32-byte sealing key".into());
        };
        if lock(&self.credentials).contains_key(id.as_str()) {
            return refuse(format!(
                "device {id} is already enrolled; `baton device revoke {id}` first to enroll it again"
            ));
        }
        // A token of one tenant cannot take over another tenant's device.
        if self.device_tenant(id).is_some_and(|t| t != token.tenant) {
            return refuse(format!("device id {id} is taken"));
        }
        match lock(&self.store).spend_token(&token.id) {
            Ok(true) => {}
            Ok(false) => return refuse("token used up".into()),
            Err(e) => return refuse(e.to_string()),
        }
        // Not `issue_credentials`: that would cut this very (join) session.
        let password = match self.new_credentials(id, &token.tenant, now) {
            Ok(p) => p,
            Err(e) => return refuse(e.to_string()),
        };
        let sealed =
            match crypto::seal(&key, &crypto::secret_context(id.as_str(), "enroll", "password"), password.as_bytes()) {
                Ok(s) => s,
                Err(e) => return refuse(e.to_string()),
            };
        let device = {
            let mut fleet = lock(&self.fleet);
            fleet.register(id, req.sealing_key.clone(), token.labels.clone(), &token.tenant, now);
            fleet.get(id).cloned()
        };
        if let Some(d) = device {
            self.persist(&d);
        }
        let message = format!("enrolled with token {}", token.id);
        self.event(&lock(&self.store), &token.tenant, "device.enrolled", id.as_str(), message, now);
        baton_protocol::EnrollResponse { sealed_password: sealed, error: None }
    }

    /// `baton device revoke ID`: the device can no longer connect, and its
    /// open connections are cut.
    /// A tenant may revoke only its own devices; a fleet-wide operator any
    /// id, known or not.
    pub fn revoke_device(&self, id: &str, now: Millis, scope: &Scope) -> Result<(), OpError> {
        let id = parse_id(id)?;
        let tenant = match (self.device_tenant(&id), scope) {
            (Some(t), s) if s.sees(&t) => t,
            (None, Scope::All) => crate::tenant::default_tenant(),
            _ => return Err(OpError::NotFound(format!("device {id} not found"))),
        };
        let store = lock(&self.store);
        let had = store.revoke(id.as_str(), now)?;
        self.event(&store, &tenant, "device.revoked", id.as_str(), "revoked".into(), now);
        drop(store);
        lock(&self.credentials).remove(id.as_str());
        lock(&self.said_errors).remove(id.as_str());
        if let Some(g) = self.broker.get() {
            g.disconnect(id.as_str());
        }
        self.dynsec_send(|| crate::dynsec::remove_device(id.as_str()));
        // Its Last Will may never come (a broker drops it once the account is
        // gone): the controller says "offline" for it, retained, as the Will would.
        let last = lock(&self.fleet).get(&id).map(|d| d.presence.clone());
        if let Some(p) = last.filter(|p| p.state == PresenceState::Online) {
            let offline = baton_protocol::Presence { state: PresenceState::Offline, ..p };
            if let Ok(bytes) = encode(&Message::Presence(offline.clone())) {
                let _ = self.outbox.send(Outgoing::Retained(id.topic(baton_protocol::TopicKind::Presence), bytes));
            }
            self.apply(&id, FleetEvent::Presence(offline), Delivery::Live, now);
        }
        if !had {
            tracing::info!(device = %id, "revoked a device that had no credentials");
        }
        Ok(())
    }
}
