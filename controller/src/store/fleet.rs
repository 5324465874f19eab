//! Devices, their credentials, the desired documents last issued to them,
//! and the event log.

use std::collections::BTreeMap;

use baton_protocol::spec::WorkloadSpec;
use baton_protocol::DeviceId;
use rusqlite::{params, OptionalExtension};

use crate::fleet::Device;
use crate::view::Event;

use super::{Store, StoreError, StoredDesired, EVENT_HISTORY};

impl Store {
    pub fn save_device(&self, device: &Device) -> Result<(), StoreError> {
        let doc =
            serde_json::to_string(device).map_err(|source| StoreError::Corrupt { id: device.id.clone(), source })?;
        self.conn.execute(
            "INSERT INTO devices (id, doc, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at",
            params![device.id, doc, device.last_seen as i64],
        )?;
        Ok(())
    }

    /// Writes many devices in one transaction (the periodic `last_seen` flush).
    pub fn save_devices<'a>(&mut self, devices: impl IntoIterator<Item = &'a Device>) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let mut n = 0;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO devices (id, doc, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at",
            )?;
            for device in devices {
                let doc = serde_json::to_string(device)
                    .map_err(|source| StoreError::Corrupt { id: device.id.clone(), source })?;
                stmt.execute(params![device.id, doc, device.last_seen as i64])?;
                n += 1;
            }
        }
        tx.commit()?;
        Ok(n)
    }

    pub fn add_event(&self, e: &Event) -> Result<(), StoreError> {
        let id: i64 = self.conn.query_row(
            "INSERT INTO events (at, kind, subject, message, tenant, name) VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
            params![e.at_ms as i64, e.kind, e.subject, e.message, e.tenant, e.name],
            |r| r.get(0),
        )?;
        if id % 1000 == 0 {
            self.conn.execute("DELETE FROM events WHERE id <= ?1", [id - EVENT_HISTORY])?;
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
        let mut stmt = self.conn.prepare(
            "SELECT at, kind, subject, message, tenant, name FROM events
             WHERE (?1 IS NULL OR subject = ?1) AND (?2 IS NULL OR tenant = ?2) ORDER BY id DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![subject, tenant, limit as i64], |r| {
            Ok(Event {
                at_ms: r.get::<_, i64>(0)? as u64,
                kind: r.get(1)?,
                subject: r.get(2)?,
                message: r.get(3)?,
                tenant: r.get(4)?,
                name: r.get(5)?,
            })
        })?;
        let mut out: Vec<Event> = rows.collect::<Result<_, _>>()?;
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
        self.conn.execute(
            "INSERT INTO desired (device, generation, workloads, payload) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(device) DO UPDATE SET generation = excluded.generation, workloads = excluded.workloads,
             payload = excluded.payload",
            params![device, generation as i64, json, payload],
        )?;
        Ok(())
    }

    /// Device → (generation, workloads, payload) as last published (no
    /// payload for documents stored before documents were signed).
    pub fn load_desired(&self) -> Result<BTreeMap<String, StoredDesired>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT device, generation, workloads, payload FROM desired")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?, r.get::<_, Option<Vec<u8>>>(3)?))
        })?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (device, generation, workloads, payload) = row?;
            let workloads = serde_json::from_str(&workloads)
                .map_err(|source| StoreError::Corrupt { id: format!("desired {device}"), source })?;
            out.insert(device, StoredDesired { generation: generation as u64, workloads, payload });
        }
        Ok(out)
    }

    pub fn save_credentials(&self, device: &str, hash: &[u8], now: u64) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM revoked WHERE device = ?1", [device])?;
        self.conn.execute(
            "INSERT INTO credentials (device, hash, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(device) DO UPDATE SET hash = excluded.hash, created_at = excluded.created_at",
            params![device, hash, now as i64],
        )?;
        Ok(())
    }

    /// Device → password hash.
    pub fn load_credentials(&self) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT device, hash FROM credentials")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes a device's credentials and records the revocation.
    pub fn revoke(&self, device: &str, now: u64) -> Result<bool, StoreError> {
        let had = self.conn.execute("DELETE FROM credentials WHERE device = ?1", [device])? > 0;
        self.conn.execute(
            "INSERT INTO revoked (device, at) VALUES (?1, ?2) ON CONFLICT(device) DO UPDATE SET at = excluded.at",
            params![device, now as i64],
        )?;
        Ok(had)
    }

    pub fn load_device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        let doc: Option<String> =
            self.conn.query_row("SELECT doc FROM devices WHERE id = ?1", [id.as_str()], |r| r.get(0)).optional()?;
        doc.map(|d| serde_json::from_str(&d).map_err(|source| StoreError::Corrupt { id: id.to_string(), source }))
            .transpose()
    }

    /// Every stored device. A row that no longer parses is an error naming it,
    /// not a silently shorter fleet.
    pub fn load_devices(&self) -> Result<Vec<(DeviceId, Device)>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT id, doc FROM devices ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, doc) = row?;
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
