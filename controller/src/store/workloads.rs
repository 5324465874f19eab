//! Workloads, their revisions and rollouts, and secrets (encrypted).

use std::collections::BTreeMap;

use baton_protocol::spec::WorkloadSpec;

use crate::rollout::Rollout;
use crate::workload::Manifest;

use super::{args, Store, StoreError, StoredSecret, StoredWorkload, REVISION_HISTORY, SECRET_HISTORY};

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
        self.db.execute(
            "INSERT INTO workloads (name, manifest, spec, updated_at, stable, tenant) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(name) DO UPDATE SET manifest = excluded.manifest, spec = excluded.spec,
                updated_at = excluded.updated_at, stable = excluded.stable",
            args![id, Self::json(id, manifest)?, Self::json(id, latest)?, now as i64, stable as i64, tenant],
        )?;
        Ok(())
    }

    /// Records a revision, and forgets the oldest beyond the history kept
    /// (never one named in `keep`).
    pub fn save_revision(&self, spec: &WorkloadSpec, keep: &[u64], now: u64) -> Result<(), StoreError> {
        let id = &spec.name;
        self.db.execute(
            "INSERT INTO revisions (workload, revision, spec, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(workload, revision) DO UPDATE SET spec = excluded.spec, created_at = excluded.created_at",
            args![id, spec.revision as i64, Self::json(id, spec)?, now as i64],
        )?;
        let old = self.db.query(
            "SELECT revision FROM revisions WHERE workload = ?1 ORDER BY revision DESC LIMIT ?3 OFFSET ?2",
            args![id, REVISION_HISTORY as i64, i64::MAX],
        )?;
        for mut r in old {
            let rev = r.int(0)?;
            if !keep.contains(&(rev as u64)) {
                self.db.execute("DELETE FROM revisions WHERE workload = ?1 AND revision = ?2", args![id, rev])?;
            }
        }
        Ok(())
    }

    pub fn save_rollout(&self, rollout: &Rollout) -> Result<(), StoreError> {
        let id = &rollout.workload;
        self.db.execute(
            "INSERT INTO rollouts (workload, doc) VALUES (?1, ?2) ON CONFLICT(workload) DO UPDATE SET doc = excluded.doc",
            args![id, Self::json(id, rollout)?],
        )?;
        Ok(())
    }

    pub fn delete_workload(&self, name: &str) -> Result<bool, StoreError> {
        self.db.execute("DELETE FROM revisions WHERE workload = ?1", args![name])?;
        self.db.execute("DELETE FROM rollouts WHERE workload = ?1", args![name])?;
        Ok(self.db.execute("DELETE FROM workloads WHERE name = ?1", args![name])? > 0)
    }

    pub fn load_workloads(&self) -> Result<Vec<StoredWorkload>, StoreError> {
        let rows =
            self.db.query("SELECT name, manifest, spec, stable, tenant FROM workloads ORDER BY name", args![])?;
        let mut out = Vec::new();
        for mut r in rows {
            let (name, manifest, spec, stable, tenant) = (r.text(0)?, r.text(1)?, r.text(2)?, r.int(3)?, r.text(4)?);
            let corrupt = |source| StoreError::Corrupt { id: format!("workload {name}"), source };
            let latest: WorkloadSpec = serde_json::from_str(&spec).map_err(corrupt)?;
            let mut revisions = BTreeMap::new();
            for mut doc in self.db.query("SELECT spec FROM revisions WHERE workload = ?1", args![&name])? {
                let s: WorkloadSpec = serde_json::from_str(&doc.text(0)?).map_err(corrupt)?;
                revisions.insert(s.revision, s);
            }
            let rollout = match self.db.query_opt("SELECT doc FROM rollouts WHERE workload = ?1", args![&name])? {
                Some(mut doc) => Some(serde_json::from_str(&doc.text(0)?).map_err(corrupt)?),
                None => None,
            };
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
    pub fn put_secret(&self, tenant: &str, name: &str, version: u64, data: &[u8], now: u64) -> Result<(), StoreError> {
        let version = version as i64;
        let tx = self.db.begin()?;
        self.db.execute(
            "INSERT INTO secrets (name, version, data, created_at, tenant) VALUES (?1, ?2, ?3, ?4, ?5)",
            args![name, version, data, now as i64, tenant],
        )?;
        self.db
            .execute("DELETE FROM secrets WHERE name = ?1 AND version <= ?2", args![name, version - SECRET_HISTORY])?;
        tx.commit()?;
        Ok(())
    }

    /// A secret's latest version, as listed; `None` when there is none.
    pub fn secret_latest(&self, name: &str) -> Result<Option<StoredSecret>, StoreError> {
        Ok(self.secrets_named(Some(name))?.pop())
    }

    /// One version's encrypted value.
    pub fn secret(&self, name: &str, version: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let row = self
            .db
            .query_opt("SELECT data FROM secrets WHERE name = ?1 AND version = ?2", args![name, version as i64])?;
        row.map(|mut r| r.blob(0)).transpose()
    }

    /// Every secret: name, latest version, when it was set, its tenant.
    pub fn list_secrets(&self) -> Result<Vec<StoredSecret>, StoreError> {
        self.secrets_named(None)
    }

    pub fn delete_secret(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.db.execute("DELETE FROM secrets WHERE name = ?1", args![name])? > 0)
    }
}
