//! Webhooks: created with a signing secret (shown once, kept encrypted),
//! listed with their delivery state, deleted; tenant-scoped as everything.
//! Delivery itself is `crate::webhook`'s, at the edge.

use baton_protocol::crypto;

use crate::fleet::Millis;
use crate::store::StoredWebhook;
use crate::tenant::Scope;
use crate::view::{WebhookCreated, WebhookView};

use super::{lock, Controller, OpError};

/// Binds a stored webhook secret to its webhook.
pub(super) fn webhook_aad(id: &str) -> Vec<u8> {
    format!("baton webhook {id}").into_bytes()
}

pub(super) fn view_of(w: &StoredWebhook) -> WebhookView {
    WebhookView {
        id: w.id.clone(),
        url: w.url.clone(),
        events: w.events.clone(),
        tenant: (!w.tenant.is_empty()).then(|| w.tenant.clone()),
        created_at_ms: w.created_at,
        ..WebhookView::default()
    }
}

impl Controller {
    /// `baton webhook create`: POSTs the events matching `events` (of the
    /// caller's tenant; a fleet-wide caller's: every tenant's) to `url`.
    pub fn create_webhook(
        &self,
        url: &str,
        events: Vec<String>,
        now: Millis,
        scope: &Scope,
    ) -> Result<WebhookCreated, OpError> {
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.contains(char::is_whitespace) {
            return Err(OpError::Invalid(format!("{url:?}: a webhook URL is http://… or https://…")));
        }
        if events.is_empty() {
            return Err(OpError::Invalid("name the events to send: --events rollout.*,device.offline (or *)".into()));
        }
        for e in &events {
            crate::webhook::check_pattern(e).map_err(OpError::Invalid)?;
        }
        let (id, secret, _) = crate::keys::new_secret().map_err(|e| OpError::Invalid(e.to_string()))?;
        let sealed = crypto::encrypt(&self.keys.secrets, &webhook_aad(&id), secret.as_bytes())
            .map_err(|e| OpError::Invalid(e.to_string()))?;
        let tenant = scope.tenant().unwrap_or_default().to_string();
        let stored = StoredWebhook { id: id.clone(), tenant, url: url.into(), events, secret: sealed, created_at: now };
        let store = lock(&self.store);
        store.save_webhook(&stored)?;
        let what = format!("webhook to {url} for {} created", stored.events.join(","));
        self.event(&store, &stored.tenant, "webhook.created", &id, what, now);
        drop(store);
        let view = view_of(&stored);
        self.webhooks.start(view.clone(), secret.clone().into_bytes());
        Ok(WebhookCreated { secret, webhook: view })
    }

    pub fn webhooks(&self, scope: &Scope) -> Vec<WebhookView> {
        self.webhooks.views(scope)
    }

    pub fn delete_webhook(&self, id: &str, now: Millis, scope: &Scope) -> Result<(), OpError> {
        let not_found = || OpError::NotFound(format!("webhook {id} not found"));
        let w = self.webhooks.views(scope).into_iter().find(|w| w.id == id).ok_or_else(not_found)?;
        let store = lock(&self.store);
        if !store.delete_webhook(id)? {
            return Err(not_found());
        }
        let tenant = w.tenant.unwrap_or_default();
        self.event(&store, &tenant, "webhook.deleted", id, "deleted".into(), now);
        drop(store);
        self.webhooks.remove(id);
        Ok(())
    }
}
