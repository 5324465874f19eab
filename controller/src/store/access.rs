//! Join tokens and operator API tokens (secrets as hashes only).

use rusqlite::{params, OptionalExtension};

use super::{ApiToken, Store, StoreError, StoredToken, StoredWebhook};

impl Store {
    pub fn save_token(&self, t: &StoredToken, hash: &[u8]) -> Result<(), StoreError> {
        let labels =
            serde_json::to_string(&t.labels).map_err(|source| StoreError::Corrupt { id: t.id.clone(), source })?;
        self.conn.execute(
            "INSERT INTO tokens (id, hash, expires_at, uses_left, labels, created_at, tenant)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![t.id, hash, t.expires_at as i64, i64::from(t.uses_left), labels, t.created_at as i64, t.tenant],
        )?;
        Ok(())
    }

    /// A token and its secret's hash.
    pub fn token(&self, id: &str) -> Result<Option<(StoredToken, Vec<u8>)>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT id, hash, expires_at, uses_left, labels, created_at, tenant FROM tokens WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, String>(6)?,
                    ))
                },
            )
            .optional()?;
        let Some((id, hash, expires_at, uses_left, labels, created_at, tenant)) = row else { return Ok(None) };
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
        let ids: Vec<String> = {
            let mut stmt = self.conn.prepare("SELECT id FROM tokens ORDER BY created_at")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
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
        Ok(self.conn.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?1 AND uses_left > 0", [id])? == 1)
    }

    pub fn delete_token(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute("DELETE FROM tokens WHERE id = ?1", [id])? > 0)
    }

    pub fn save_api_token(&self, t: &ApiToken, hash: &[u8]) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO api_tokens (id, hash, role, name, created_at, tenant) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![t.id, hash, t.role.as_str(), t.name, t.created_at as i64, t.tenant.as_deref().unwrap_or("")],
        )?;
        Ok(())
    }

    /// Every API token with its secret's hash.
    pub fn api_tokens(&self) -> Result<Vec<(ApiToken, Vec<u8>)>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT id, hash, role, name, created_at, tenant FROM api_tokens ORDER BY created_at")?;
        let rows = stmt.query_map([], |r| {
            let tenant: String = r.get(5)?;
            Ok((
                ApiToken {
                    id: r.get(0)?,
                    role: {
                        let role: String = r.get(2)?;
                        role.parse().map_err(|e: String| {
                            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, e.into())
                        })?
                    },
                    name: r.get(3)?,
                    created_at: r.get::<_, i64>(4)? as u64,
                    tenant: (!tenant.is_empty()).then_some(tenant),
                },
                r.get::<_, Vec<u8>>(1)?,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn delete_api_token(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute("DELETE FROM api_tokens WHERE id = ?1", [id])? > 0)
    }

    pub fn save_webhook(&self, w: &StoredWebhook) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO webhooks (id, tenant, url, events, secret, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![w.id, w.tenant, w.url, w.events.join(","), w.secret, w.created_at as i64],
        )?;
        Ok(())
    }

    pub fn webhooks(&self) -> Result<Vec<StoredWebhook>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, tenant, url, events, secret, created_at FROM webhooks ORDER BY created_at")?;
        let rows = stmt.query_map([], |r| {
            let events: String = r.get(3)?;
            Ok(StoredWebhook {
                id: r.get(0)?,
                tenant: r.get(1)?,
                url: r.get(2)?,
                events: events.split(',').filter(|e| !e.is_empty()).map(str::to_string).collect(),
                secret: r.get(4)?,
                created_at: r.get::<_, i64>(5)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn delete_webhook(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute("DELETE FROM webhooks WHERE id = ?1", [id])? > 0)
    }
}
