//! Join tokens and operator API tokens (secrets as hashes only).

use super::{args, ApiToken, Store, StoreError, StoredToken, StoredWebhook};

impl Store {
    pub fn save_token(&self, t: &StoredToken, hash: &[u8]) -> Result<(), StoreError> {
        let labels =
            serde_json::to_string(&t.labels).map_err(|source| StoreError::Corrupt { id: t.id.clone(), source })?;
        self.db.execute(
            "INSERT INTO tokens (id, hash, expires_at, uses_left, labels, created_at, tenant)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            args![&t.id, hash, t.expires_at as i64, t.uses_left, labels, t.created_at as i64, &t.tenant],
        )?;
        Ok(())
    }

    /// A token and its secret's hash.
    pub fn token(&self, id: &str) -> Result<Option<(StoredToken, Vec<u8>)>, StoreError> {
        let row = self.db.query_opt(
            "SELECT id, hash, expires_at, uses_left, labels, created_at, tenant FROM tokens WHERE id = ?1",
            args![id],
        )?;
        let Some(mut r) = row else { return Ok(None) };
        let (id, hash, expires_at, uses_left, labels, created_at, tenant) =
            (r.text(0)?, r.blob(1)?, r.int(2)?, r.int(3)?, r.text(4)?, r.int(5)?, r.text(6)?);
        let labels = serde_json::from_str(&labels).map_err(|source| StoreError::Corrupt { id: id.clone(), source })?;
        let t = StoredToken {
            id,
            expires_at: expires_at as u64,
            uses_left: uses_left.clamp(0, i64::from(u32::MAX)) as u32,
            labels,
            created_at: created_at as u64,
            tenant,
        };
        Ok(Some((t, hash)))
    }

    pub fn tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        let ids = self.db.query("SELECT id FROM tokens ORDER BY created_at", args![])?;
        let ids = ids.into_iter().map(|mut r| r.text(0)).collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::new();
        for id in ids {
            if let Some((t, _)) = self.token(&id)? {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Spends one use of a token; false when none is left.
    pub fn spend_token(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.db.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?1 AND uses_left > 0", args![id])?
            == 1)
    }

    pub fn delete_token(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.db.execute("DELETE FROM tokens WHERE id = ?1", args![id])? > 0)
    }

    pub fn save_api_token(&self, t: &ApiToken, hash: &[u8]) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO api_tokens (id, hash, role, name, created_at, tenant) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            args![&t.id, hash, t.role.as_str(), &t.name, t.created_at as i64, t.tenant.as_deref().unwrap_or("")],
        )?;
        Ok(())
    }

    /// Every API token with its secret's hash.
    pub fn api_tokens(&self) -> Result<Vec<(ApiToken, Vec<u8>)>, StoreError> {
        let rows = self
            .db
            .query("SELECT id, hash, role, name, created_at, tenant FROM api_tokens ORDER BY created_at", args![])?;
        rows.into_iter()
            .map(|mut r| {
                let tenant = r.text(5)?;
                let id = r.text(0)?;
                let role = r.text(2)?.parse().map_err(|e: String| StoreError::Sql(format!("API token {id}: {e}")))?;
                let token = ApiToken {
                    id,
                    role,
                    name: r.text(3)?,
                    created_at: r.int(4)? as u64,
                    tenant: (!tenant.is_empty()).then_some(tenant),
                };
                Ok((token, r.blob(1)?))
            })
            .collect()
    }

    pub fn delete_api_token(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.db.execute("DELETE FROM api_tokens WHERE id = ?1", args![id])? > 0)
    }

    pub fn save_webhook(&self, w: &StoredWebhook) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO webhooks (id, tenant, url, events, secret, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            args![&w.id, &w.tenant, &w.url, w.events.join(","), &w.secret, w.created_at as i64],
        )?;
        Ok(())
    }

    pub fn webhooks(&self) -> Result<Vec<StoredWebhook>, StoreError> {
        let rows = self
            .db
            .query("SELECT id, tenant, url, events, secret, created_at FROM webhooks ORDER BY created_at", args![])?;
        rows.into_iter()
            .map(|mut r| {
                let events = r.text(3)?;
                Ok(StoredWebhook {
                    id: r.text(0)?,
                    tenant: r.text(1)?,
                    url: r.text(2)?,
                    events: events.split(',').filter(|e| !e.is_empty()).map(str::to_string).collect(),
                    secret: r.blob(4)?,
                    created_at: r.int(5)? as u64,
                })
            })
            .collect()
    }

    pub fn delete_webhook(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.db.execute("DELETE FROM webhooks WHERE id = ?1", args![id])? > 0)
    }
}
