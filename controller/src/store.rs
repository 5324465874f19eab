//! Durable state in SQLite: the source of truth the controller rebuilds from
//! after a restart. Schema changes are numbered migrations applied in order at
//! open; `PRAGMA user_version` records how far a database has come.

use std::path::Path;

use std::collections::BTreeMap;

use baton_protocol::spec::WorkloadSpec;
use baton_protocol::DeviceId;
use rusqlite::{params, Connection, OptionalExtension};

use crate::fleet::Device;
use crate::rollout::Rollout;
use crate::view::Event;
use crate::workload::Manifest;

/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: devices, each stored as one JSON document keyed by id.
    "CREATE TABLE devices (
        id TEXT PRIMARY KEY NOT NULL,
        doc TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    ) STRICT;",
    // 2: workloads (manifest and the device-side spec, as JSON), and the
    // desired document each device was last given (its generation and workloads).
    "CREATE TABLE workloads (
        name TEXT PRIMARY KEY NOT NULL,
        manifest TEXT NOT NULL,
        spec TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE desired (
        device TEXT PRIMARY KEY NOT NULL,
        generation INTEGER NOT NULL,
        workloads TEXT NOT NULL
    ) STRICT;",
    // 3: revision history, the revision the fleet settled on (`stable`),
    // rollouts in progress or finished (one JSON document per workload), and
    // the event log.
    "CREATE TABLE revisions (
        workload TEXT NOT NULL,
        revision INTEGER NOT NULL,
        spec TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (workload, revision)
    ) STRICT;
    ALTER TABLE workloads ADD COLUMN stable INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE rollouts (
        workload TEXT PRIMARY KEY NOT NULL,
        doc TEXT NOT NULL
    ) STRICT;
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        message TEXT NOT NULL
    ) STRICT;",
    // 4: each device's document exactly as signed and published (so a
    // restarted controller republishes the same bytes), and secrets: every
    // kept version encrypted at rest (`crypto::encrypt` with the secrets key).
    "ALTER TABLE desired ADD COLUMN payload BLOB;
    CREATE TABLE secrets (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        data BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (name, version)
    ) STRICT;",
    // 5: per-device MQTT credentials (SHA-256 of a random password, checked
    // by the gateway in front of the embedded broker) and revoked devices.
    "CREATE TABLE credentials (
        device TEXT PRIMARY KEY NOT NULL,
        hash BLOB NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE revoked (
        device TEXT PRIMARY KEY NOT NULL,
        at INTEGER NOT NULL
    ) STRICT;",
    // 6: join tokens (SHA-256 of the secret), with expiry, uses left and the
    // operator labels a device joining with them gets.
    "CREATE TABLE tokens (
        id TEXT PRIMARY KEY NOT NULL,
        hash BLOB NOT NULL,
        expires_at INTEGER NOT NULL,
        uses_left INTEGER NOT NULL,
        labels TEXT NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;",
    // 7: operator API tokens (SHA-256 of the secret) with their role.
    "CREATE TABLE api_tokens (
        id TEXT PRIMARY KEY NOT NULL,
        hash BLOB NOT NULL,
        role TEXT NOT NULL,
        name TEXT NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;",
    // 8: tenants. Everything from before belongs to the default tenant; an
    // API token with an empty tenant is fleet-wide; an event's tenant is the
    // one of its subject ('' for fleet-wide subjects).
    "ALTER TABLE workloads ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE secrets ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE tokens ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE api_tokens ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
    ALTER TABLE events ADD COLUMN tenant TEXT NOT NULL DEFAULT '';",
];

/// Versions kept per secret (revisions in history may still name older ones).
pub const SECRET_HISTORY: i64 = 10;

/// Revisions kept per workload besides the stable one and those of its rollout.
pub const REVISION_HISTORY: usize = 10;
/// Events kept; older ones are dropped as new ones arrive.
const EVENT_HISTORY: i64 = 10_000;

/// A stored workload: its manifest, every kept revision, the newest and the
/// one the fleet settled on, and its last rollout.
#[derive(Debug, Clone)]
pub struct StoredWorkload {
    pub tenant: String,
    pub manifest: Manifest,
    pub revisions: BTreeMap<u64, WorkloadSpec>,
    pub latest: u64,
    pub stable: u64,
    pub rollout: Option<Rollout>,
}

/// An operator API token as stored (its secret only as a hash).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApiToken {
    pub id: String,
    pub role: crate::view::Role,
    pub name: String,
    pub created_at: u64,
    /// The tenant it acts for; `None`: fleet-wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// A join token as stored (its secret only as a hash).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredToken {
    pub id: String,
    pub expires_at: u64,
    pub uses_left: u32,
    pub labels: BTreeMap<String, String>,
    pub created_at: u64,
    /// The tenant a device joining with it belongs to.
    #[serde(default = "crate::tenant::default_tenant")]
    pub tenant: String,
}

/// A secret's latest version, as listed (never its value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSecret {
    pub name: String,
    pub version: u64,
    pub updated_at: u64,
    pub tenant: String,
}

/// A device's last published document as stored.
#[derive(Debug, Clone)]
pub struct StoredDesired {
    pub generation: u64,
    pub workloads: Vec<WorkloadSpec>,
    pub payload: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error(
        "database {path} has schema version {found}, newer than this controller's {known}; upgrade the controller"
    )]
    TooNew { path: String, found: usize, known: usize },
    #[error("database: {0}")]
    Sql(rusqlite::Error),
    #[error("the controller's data disk is full: nothing of this was stored (free space on it and retry)")]
    Full,
    #[error("backup through {path}: {source}")]
    Backup { path: String, source: std::io::Error },
    #[error("stored device {id} is unreadable: {source}")]
    Corrupt { id: String, source: serde_json::Error },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StoreError::Full,
            _ => StoreError::Sql(e),
        }
    }
}

/// Writes that land together or not at all: dropped without `commit`, none of them did.
pub struct Batch<'a>(rusqlite::Transaction<'a>);

impl Batch<'_> {
    pub fn commit(self) -> Result<(), StoreError> {
        Ok(self.0.commit()?)
    }
}

pub struct Store {
    conn: Connection,
    /// The database file (backups are written beside it first).
    path: std::path::PathBuf,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open { path: path.display().to_string(), source };
        let conn = Connection::open(path).map_err(open_err)?;
        // WAL: readers never block the ingest writer; NORMAL is durable across
        // process crashes, and at worst loses the last commit on power loss.
        conn.pragma_update(None, "journal_mode", "WAL").map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(open_err)?;
        let mut store = Self { conn, path: path.to_path_buf() };
        store.migrate(path)?;
        Ok(store)
    }

    /// Starts writes that must all land or none: every write through this
    /// store until the batch is committed belongs to it.
    pub fn batch(&self) -> Result<Batch<'_>, StoreError> {
        Ok(Batch(self.conn.unchecked_transaction()?))
    }

    /// A consistent copy of the whole database, taken while it serves
    /// (SQLite's `VACUUM INTO`: one read transaction, so no half-done apply is
    /// in it). Restoring it is copying it over `baton.db` of a stopped controller.
    pub fn backup(&self) -> Result<Vec<u8>, StoreError> {
        let copy = self.path.with_extension(format!("backup-{}", std::process::id()));
        let _ = std::fs::remove_file(&copy);
        let io = |source: std::io::Error| StoreError::Backup { path: copy.display().to_string(), source };
        let taken = self.conn.execute("VACUUM INTO ?1", [copy.display().to_string()]);
        let bytes = taken.map_err(StoreError::from).and_then(|_| std::fs::read(&copy).map_err(io));
        let _ = std::fs::remove_file(&copy);
        bytes
    }

    /// Puts a backup in place of the database at `db` (the controller
    /// stopped: hold its `DataDirLock`). The backup is checked first by opening
    /// a copy as a store (an older schema is migrated, a newer one refused);
    /// the write-ahead log of the database it replaces is removed with it, or
    /// SQLite would replay it onto the restored file.
    pub fn restore(backup: &Path, db: &Path) -> Result<(), StoreError> {
        let staged = db.with_extension("restoring");
        let io = |source: std::io::Error| StoreError::Backup { path: staged.display().to_string(), source };
        std::fs::copy(backup, &staged).map_err(io)?;
        if let Err(e) = Store::open(&staged) {
            let _ = std::fs::remove_file(&staged);
            return Err(e);
        }
        for suffix in ["-wal", "-shm"] {
            let mut side = db.as_os_str().to_owned();
            side.push(suffix);
            match std::fs::remove_file(&side) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
                _ => {}
            }
        }
        std::fs::rename(&staged, db).map_err(io)
    }

    pub fn schema_version(&self) -> Result<usize, StoreError> {
        Ok(self.conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize)
    }

    fn migrate(&mut self, path: &Path) -> Result<(), StoreError> {
        let found = self.schema_version()?;
        if found > MIGRATIONS.len() {
            return Err(StoreError::TooNew { path: path.display().to_string(), found, known: MIGRATIONS.len() });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
            tracing::info!(version = i + 1, "applied store migration");
        }
        Ok(())
    }

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

    fn json<T: serde::Serialize>(id: &str, v: &T) -> Result<String, StoreError> {
        serde_json::to_string(v).map_err(|source| StoreError::Corrupt { id: id.into(), source })
    }

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

    pub fn add_event(&self, e: &Event) -> Result<(), StoreError> {
        let id: i64 = self.conn.query_row(
            "INSERT INTO events (at, kind, subject, message, tenant) VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
            params![e.at_ms as i64, e.kind, e.subject, e.message, e.tenant],
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
            "SELECT at, kind, subject, message, tenant FROM events
             WHERE (?1 IS NULL OR subject = ?1) AND (?2 IS NULL OR tenant = ?2) ORDER BY id DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![subject, tenant, limit as i64], |r| {
            Ok(Event {
                at_ms: r.get::<_, i64>(0)? as u64,
                kind: r.get(1)?,
                subject: r.get(2)?,
                message: r.get(3)?,
                tenant: r.get(4)?,
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

    /// The secret called `name` (every secret when `None`), latest versions.
    fn secrets_named(&self, name: Option<&str>) -> Result<Vec<StoredSecret>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT name, MAX(version), MAX(created_at), MAX(tenant) FROM secrets WHERE ?1 IS NULL OR name = ?1
             GROUP BY name ORDER BY name",
        )?;
        let rows = stmt.query_map([name], |r| {
            Ok(StoredSecret {
                name: r.get(0)?,
                version: r.get::<_, i64>(1)? as u64,
                updated_at: r.get::<_, i64>(2)? as u64,
                tenant: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
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

    pub fn delete_secret(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute("DELETE FROM secrets WHERE name = ?1", [name])? > 0)
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

#[cfg(test)]
mod tests {
    use super::*;
    use baton_protocol::{Presence, PresenceState};

    fn device(id: &str) -> Device {
        Device {
            id: id.into(),
            first_seen: 1,
            last_seen: 2,
            presence: Presence {
                state: PresenceState::Online,
                agent_version: "0.1.0".into(),
                boot_id: "b".into(),
                started_at: 3,
            },
            inventory: None,
            heartbeat: None,
            operator_labels: [("k".to_string(), "v".to_string())].into(),
            report: None,
            tenant: "acme".into(),
            offline_since: None,
            refusal: None,
            clock_offset_ms: None,
        }
    }

    #[test]
    fn a_backup_opens_as_a_store_with_everything_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("baton.db")).unwrap();
        store.save_device(&device("a")).unwrap();
        let bytes = store.backup().unwrap();
        store.save_device(&device("b")).unwrap();
        let restored = dir.path().join("restored.db");
        std::fs::write(&restored, bytes).unwrap();
        let back = Store::open(&restored).unwrap();
        let ids: Vec<String> = back.load_devices().unwrap().into_iter().map(|(id, _)| id.to_string()).collect();
        assert_eq!(ids, ["a"], "the backup is the store as it was when taken");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("backup"))
            .collect();
        assert!(left.is_empty(), "a temporary copy was left behind: {left:?}");
    }

    #[test]
    fn migrates_once_and_round_trips_devices_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baton.db");
        {
            let mut s = Store::open(&path).unwrap();
            assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len());
            s.save_device(&device("a")).unwrap();
            let mut b = device("b");
            s.save_devices([&b]).unwrap();
            b.last_seen = 99;
            s.save_device(&b).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let all = s.load_devices().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].1.last_seen, 99);
        assert_eq!(s.load_device(&DeviceId::new("a").unwrap()).unwrap(), Some(device("a")));
    }

    #[test]
    fn a_database_from_before_tenants_puts_everything_in_the_default_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baton.db");
        {
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..7] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 7).unwrap();
            let mut doc = serde_json::to_value(device("old")).unwrap();
            doc.as_object_mut().unwrap().remove("tenant");
            conn.execute("INSERT INTO devices VALUES ('old', ?1, 0)", [doc.to_string()]).unwrap();
            let spec = WorkloadSpec { name: "web".into(), revision: 1, ..Default::default() };
            let manifest = serde_json::json!({"name": "web", "image": "x"});
            conn.execute(
                "INSERT INTO workloads (name, manifest, spec, updated_at) VALUES ('web', ?1, ?2, 0)",
                [
                    serde_json::from_value::<Manifest>(manifest).map(|m| serde_json::to_string(&m).unwrap()).unwrap(),
                    serde_json::to_string(&spec).unwrap(),
                ],
            )
            .unwrap();
            conn.execute("INSERT INTO secrets VALUES ('s', 1, x'00', 0)", []).unwrap();
            conn.execute("INSERT INTO tokens VALUES ('t', x'00', 9, 1, '{}', 0)", []).unwrap();
            conn.execute("INSERT INTO api_tokens VALUES ('a', x'00', 'admin', 'first', 0)", []).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.load_devices().unwrap()[0].1.tenant, crate::tenant::DEFAULT);
        assert_eq!(s.load_workloads().unwrap()[0].tenant, crate::tenant::DEFAULT);
        assert_eq!(s.list_secrets().unwrap()[0].tenant, crate::tenant::DEFAULT);
        assert_eq!(s.tokens().unwrap()[0].tenant, crate::tenant::DEFAULT);
        // The admin token from before is fleet-wide.
        assert_eq!(s.api_tokens().unwrap()[0].0.tenant, None);
    }

    #[test]
    fn tenants_round_trip_and_filter_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("baton.db")).unwrap();
        s.put_secret("acme", "db-password", 1, b"sealed", 5).unwrap();
        assert_eq!(s.list_secrets().unwrap()[0].tenant, "acme");
        let t = StoredToken {
            id: "t1".into(),
            expires_at: 9,
            uses_left: 1,
            labels: BTreeMap::new(),
            created_at: 1,
            tenant: "acme".into(),
        };
        s.save_token(&t, b"h").unwrap();
        assert_eq!(s.token("t1").unwrap().unwrap().0, t);
        let a = ApiToken {
            id: "a1".into(),
            role: crate::view::Role::Admin,
            name: "n".into(),
            created_at: 1,
            tenant: Some("acme".into()),
        };
        s.save_api_token(&a, b"h").unwrap();
        assert_eq!(s.api_tokens().unwrap()[0].0, a);
        for (tenant, subject) in [("acme", "web"), ("globex", "db"), ("", "first-admin")] {
            let e = Event {
                at_ms: 1,
                kind: "k".into(),
                subject: subject.into(),
                message: "m".into(),
                tenant: tenant.into(),
            };
            s.add_event(&e).unwrap();
        }
        let subjects = |tenant| -> Vec<String> {
            s.load_events(None, tenant, 10).unwrap().into_iter().map(|e| e.subject).collect()
        };
        assert_eq!(subjects(Some("acme")), ["web"]);
        assert_eq!(subjects(Some("globex")), ["db"]);
        assert_eq!(subjects(None), ["web", "db", "first-admin"]);
    }

    #[test]
    fn refuses_a_database_from_a_newer_controller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baton.db");
        Store::open(&path).unwrap().conn.pragma_update(None, "user_version", 999).unwrap();
        let e = Store::open(&path).err().unwrap().to_string();
        assert!(e.contains("schema version 999"), "{e}");
    }

    #[test]
    fn a_corrupt_row_is_an_error_naming_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("baton.db")).unwrap();
        s.conn.execute("INSERT INTO devices VALUES ('x', '{not json', 0)", []).unwrap();
        let e = s.load_devices().unwrap_err().to_string();
        assert!(e.contains("stored device x"), "{e}");
    }
}
