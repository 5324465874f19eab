//! Workloads, their revisions and rollouts, and secrets (encrypted).

use std::collections::BTreeMap;

use baton_protocol::spec::WorkloadSpec;
use rusqlite::{params, OptionalExtension};

use crate::rollout::Rollout;
use crate::workload::Manifest;

use super::{Store, StoreError, StoredSecret, StoredWorkload, REVISION_HISTORY, SECRET_HISTORY};

impl Store {
    /// Writes the manifest, the newest spec and the stable revision number.
    /// `tenant` is written when the workload is created and never changes.
    pub fn save_workload(
        &self,
        tenant: &str,
        manifest: &Manifest,
        latest: &WorkloadSpec,
        stable: u64,
        now: u64,
    ) -> Result<(), StoreError> {
        let id = &latest.name;
        self.conn.execute(
            "INSERT INTO workloads (name, manifest, spec, updated_at, stable, tenant) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(name) DO UPDATE SET manifest = excluded.manifest, spec = excluded.spec,
                updated_at = excluded.updated_at, stable = excluded.stable",
            params![id, Self::json(id, manifest)?, Self::json(id, latest)?, now as i64, stable as i64, tenant],
        )?;
        Ok(())
    }

    /// Records a revision, and forgets the oldest beyond the history kept
    /// (never one named in `keep`).
    pub fn save_revision(&self, spec: &WorkloadSpec, keep: &[u64], now: u64) -> Result<(), StoreError> {
        let id = &spec.name;
        self.conn.execute(
            "INSERT OR REPLACE INTO revisions (workload, revision, spec, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![id, spec.revision as i64, Self::json(id, spec)?, now as i64],
        )?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT revision FROM revisions WHERE workload = ?1 ORDER BY revision DESC LIMIT -1 OFFSET ?2",
        )?;
        let old: Vec<i64> =
            stmt.query_map(params![id, REVISION_HISTORY as i64], |r| r.get(0))?.collect::<Result<_, _>>()?;
        for rev in old.into_iter().filter(|r| !keep.contains(&(*r as u64))) {
            self.conn.execute("DELETE FROM revisions WHERE workload = ?1 AND revision = ?2", params![id, rev])?;
        }
        Ok(())
    }

    pub fn save_rollout(&self, rollout: &Rollout) -> Result<(), StoreError> {
        let id = &rollout.workload;
        self.conn.execute(
            "INSERT INTO rollouts (workload, doc) VALUES (?1, ?2) ON CONFLICT(workload) DO UPDATE SET doc = excluded.doc",
            params![id, Self::json(id, rollout)?],
        )?;
        Ok(())
    }

    pub fn delete_workload(&self, name: &str) -> Result<bool, StoreError> {
        self.conn.execute("DELETE FROM revisions WHERE workload = ?1", [name])?;
        self.conn.execute("DELETE FROM rollouts WHERE workload = ?1", [name])?;
        Ok(self.conn.execute("DELETE FROM workloads WHERE name = ?1", [name])? > 0)
    }

    pub fn load_workloads(&self) -> Result<Vec<StoredWorkload>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT name, manifest, spec, stable, tenant FROM workloads ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut revs = self.conn.prepare("SELECT spec FROM revisions WHERE workload = ?1")?;
        let mut rollouts = self.conn.prepare("SELECT doc FROM rollouts WHERE workload = ?1")?;
        let mut out = Vec::new();
        for row in rows {
            let (name, manifest, spec, stable, tenant) = row?;
            let corrupt = |source| StoreError::Corrupt { id: format!("workload {name}"), source };
            let latest: WorkloadSpec = serde_json::from_str(&spec).map_err(corrupt)?;
            let mut revisions = BTreeMap::new();
            for doc in revs.query_map([&name], |r| r.get::<_, String>(0))? {
                let s: WorkloadSpec = serde_json::from_str(&doc?).map_err(corrupt)?;
                revisions.insert(s.revision, s);
            }
            let rollout = rollouts
                .query_row([&name], |r| r.get::<_, String>(0))
                .optional()?
                .map(|doc| serde_json::from_str(&doc).map_err(corrupt))
                .transpose()?;
            // A database from before revisions were kept: the newest is the stable one.
            let stable = if stable == 0 { latest.revision } else { stable as u64 };
            let latest_rev = latest.revision;
            revisions.entry(latest_rev).or_insert(latest);
            out.push(StoredWorkload {
                tenant,
                manifest: serde_json::from_str(&manifest).map_err(corrupt)?,
                revisions,
                latest: latest_rev,
                stable,
                rollout,
            });
        }
        Ok(out)
    }

    /// Stores version `version` of a secret (already encrypted with that
    /// version in its associated data; see `secret_latest`); keeps the last
    /// `SECRET_HISTORY` versions.
    pub fn put_secret(
        &mut self,
        tenant: &str,
        name: &str,
        version: u64,
        data: &[u8],
        now: u64,
    ) -> Result<(), StoreError> {
        let version = version as i64;
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO secrets (name, version, data, created_at, tenant) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, version, data, now as i64, tenant],
        )?;
        tx.execute("DELETE FROM secrets WHERE name = ?1 AND version <= ?2", params![name, version - SECRET_HISTORY])?;
        tx.commit()?;
        Ok(())
    }

    /// A secret's latest version, as listed; `None` when there is none.
    pub fn secret_latest(&self, name: &str) -> Result<Option<StoredSecret>, StoreError> {
        Ok(self.secrets_named(Some(name))?.pop())
    }

    /// One version's encrypted value.
    pub fn secret(&self, name: &str, version: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT data FROM secrets WHERE name = ?1 AND version = ?2",
                params![name, version as i64],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Every secret: name, latest version, when it was set, its tenant.
    pub fn list_secrets(&self) -> Result<Vec<StoredSecret>, StoreError> {
        self.secrets_named(None)
    }

    pub fn delete_secret(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute("DELETE FROM secrets WHERE name = ?1", [name])? > 0)
    }
}
