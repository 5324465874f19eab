//! Devices, their credentials, the desired documents last issued to them,
//! and the event log.

use std::collections::BTreeMap;

use baton_protocol::spec::WorkloadSpec;
use baton_protocol::DeviceId;

use crate::fleet::Device;
use crate::view::Event;

use super::{args, Store, StoreError, StoredDesired, EVENT_HISTORY};

/// Devices written by one statement of a flush (3 values each: well under
/// SQLite's 32,766 and PostgreSQL's 65,535 parameters).
const FLUSH_ROWS: usize = 500;

const SAVE_DEVICE: &str = "INSERT INTO devices (id, doc, updated_at) VALUES (?1, ?2, ?3)
     ON CONFLICT(id) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at";

impl Store {
    pub fn save_device(&self, device: &Device) -> Result<(), StoreError> {
        let doc =
            serde_json::to_string(device).map_err(|source| StoreError::Corrupt { id: device.id.clone(), source })?;
        self.db.execute(SAVE_DEVICE, args![&device.id, doc, device.last_seen as i64])?;
        Ok(())
    }

    /// Writes many devices in one transaction (the periodic `last_seen`
    /// flush), `FLUSH_ROWS` to a statement: on PostgreSQL each statement is a
    /// round trip, and 10,000 of them held the store for a second.
    pub fn save_devices<'a>(&self, devices: impl IntoIterator<Item = &'a Device>) -> Result<usize, StoreError> {
        // One row per id (a statement may not upsert one row twice).
        let devices: BTreeMap<&str, &Device> = devices.into_iter().map(|d| (d.id.as_str(), d)).collect();
        let devices: Vec<&Device> = devices.into_values().collect();
        let tx = self.db.begin()?;
        for chunk in devices.chunks(FLUSH_ROWS) {
            let mut sql = String::from("INSERT INTO devices (id, doc, updated_at) VALUES ");
            let mut values = Vec::with_capacity(chunk.len() * 3);
            for (k, device) in chunk.iter().enumerate() {
                let doc = serde_json::to_string(device)
                    .map_err(|source| StoreError::Corrupt { id: device.id.clone(), source })?;
                let sep = if k == 0 { "" } else { ", " };
                sql.push_str(&format!("{sep}(?{}, ?{}, ?{})", 3 * k + 1, 3 * k + 2, 3 * k + 3));
                values.extend(args![&device.id, doc, device.last_seen as i64]);
            }
            sql.push_str(" ON CONFLICT(id) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at");
            self.db.execute(&sql, values)?;
        }
        tx.commit()?;
        Ok(devices.len())
    }

    pub fn add_event(&self, e: &Event) -> Result<(), StoreError> {
        let row = self.db.query_opt(
            "INSERT INTO events (at, kind, subject, message, tenant, name) VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
            args![e.at_ms as i64, &e.kind, &e.subject, &e.message, &e.tenant, &e.name],
        )?;
        let id = row.map(|mut r| r.int(0)).transpose()?.unwrap_or(0);
        if id % 1000 == 0 {
            self.db.execute("DELETE FROM events WHERE id <= ?1", args![id - EVENT_HISTORY])?;
        }
        Ok(())
    }

    /// The newest `limit` events about `subject` (all when None) of
    /// `tenant` (every tenant's when None), oldest first.
    pub fn load_events(
        &self,
        subject: Option<&str>,
        tenant: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let rows = self.db.query(
            "SELECT at, kind, subject, message, tenant, name FROM events
             WHERE (CAST(?1 AS TEXT) IS NULL OR subject = ?1) AND (CAST(?2 AS TEXT) IS NULL OR tenant = ?2) ORDER BY id DESC LIMIT ?3",
            args![subject, tenant, limit as i64],
        )?;
        let mut out = rows
            .into_iter()
            .map(|mut r| {
                Ok(Event {
                    at_ms: r.int(0)? as u64,
                    kind: r.text(1)?,
                    subject: r.text(2)?,
                    message: r.text(3)?,
                    tenant: r.text(4)?,
                    name: r.text(5)?,
                })
            })
            .collect::<Result<Vec<Event>, StoreError>>()?;
        out.reverse();
        Ok(out)
    }

    /// What a device was given: its workloads and the signed payload as published.
    pub fn save_desired(
        &self,
        device: &str,
        generation: u64,
        workloads: &[WorkloadSpec],
        payload: &[u8],
    ) -> Result<(), StoreError> {
        let json =
            serde_json::to_string(workloads).map_err(|source| StoreError::Corrupt { id: device.into(), source })?;
        self.db.execute(
            "INSERT INTO desired (device, generation, workloads, payload) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(device) DO UPDATE SET generation = excluded.generation, workloads = excluded.workloads,
             payload = excluded.payload",
            args![device, generation as i64, json, payload],
        )?;
        Ok(())
    }

    /// Device → (generation, workloads, payload) as last published (no
    /// payload for documents stored before documents were signed).
    pub fn load_desired(&self) -> Result<BTreeMap<String, StoredDesired>, StoreError> {
        let rows = self.db.query("SELECT device, generation, workloads, payload FROM desired", args![])?;
        let mut out = BTreeMap::new();
        for mut r in rows {
            let (device, generation, workloads, payload) = (r.text(0)?, r.int(1)?, r.text(2)?, r.opt_blob(3)?);
            let workloads = serde_json::from_str(&workloads)
                .map_err(|source| StoreError::Corrupt { id: format!("desired {device}"), source })?;
            out.insert(device, StoredDesired { generation: generation as u64, workloads, payload });
        }
        Ok(out)
    }

    pub fn save_credentials(&self, device: &str, hash: &[u8], now: u64) -> Result<(), StoreError> {
        self.db.execute("DELETE FROM revoked WHERE device = ?1", args![device])?;
        self.db.execute(
            "INSERT INTO credentials (device, hash, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(device) DO UPDATE SET hash = excluded.hash, created_at = excluded.created_at",
            args![device, hash, now as i64],
        )?;
        Ok(())
    }

    /// Device → password hash.
    pub fn load_credentials(&self) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
        let rows = self.db.query("SELECT device, hash FROM credentials", args![])?;
        rows.into_iter().map(|mut r| Ok((r.text(0)?, r.blob(1)?))).collect()
    }

    /// Removes a device's credentials and records the revocation.
    pub fn revoke(&self, device: &str, now: u64) -> Result<bool, StoreError> {
        let had = self.db.execute("DELETE FROM credentials WHERE device = ?1", args![device])? > 0;
        self.db.execute(
            "INSERT INTO revoked (device, at) VALUES (?1, ?2) ON CONFLICT(device) DO UPDATE SET at = excluded.at",
            args![device, now as i64],
        )?;
        Ok(had)
    }

    /// Forgets a device's record and document (`delete device`); its
    /// credentials, revocation and events stay. The document goes first: a
    /// stop between the two leaves a device without one, which is
    /// published again, never a document for a device that is gone.
    pub fn delete_device(&self, device: &str) -> Result<(), StoreError> {
        self.db.execute("DELETE FROM desired WHERE device = ?1", args![device])?;
        self.db.execute("DELETE FROM devices WHERE id = ?1", args![device])?;
        Ok(())
    }

    pub fn load_device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        let doc = self.db.query_opt("SELECT doc FROM devices WHERE id = ?1", args![id.as_str()])?;
        let doc = doc.map(|mut r| r.text(0)).transpose()?;
        doc.map(|d| serde_json::from_str(&d).map_err(|source| StoreError::Corrupt { id: id.to_string(), source }))
            .transpose()
    }

    /// Every stored device. A row that no longer parses is an error naming it,
    /// not a silently shorter fleet.
    pub fn load_devices(&self) -> Result<Vec<(DeviceId, Device)>, StoreError> {
        let rows = self.db.query("SELECT id, doc FROM devices ORDER BY id", args![])?;
        let mut out = Vec::new();
        for mut r in rows {
            let (id, doc) = (r.text(0)?, r.text(1)?);
            let device: Device =
                serde_json::from_str(&doc).map_err(|source| StoreError::Corrupt { id: id.clone(), source })?;
            let Ok(device_id) = DeviceId::new(id.clone()) else {
                return Err(StoreError::Corrupt {
                    id,
                    source: serde::de::Error::custom("stored id is not a valid device id"),
                });
            };
            out.push((device_id, device));
        }
        Ok(out)
    }
}
