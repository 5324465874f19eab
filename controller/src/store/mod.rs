//! Durable state in SQLite (the default) or PostgreSQL: the source of truth
//! the controller rebuilds from after a restart. Schema changes are numbered
//! migrations applied in order at open (`PRAGMA user_version`, or the
//! `baton_schema` table, records how far a database has come); `sql.rs` is
//! the interface both databases are spoken through.
//! This file: the schema, the row types, opening, batches, backup and
//! restore; the queries by subject in `fleet.rs` (devices, credentials,
//! desired documents, events), `workloads.rs` (workloads, revisions,
//! rollouts, secrets), `access.rs` (join and API tokens) and `releases.rs`
//! (agent builds and agent upgrades).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use baton_protocol::spec::WorkloadSpec;
use rusqlite::Connection;

use crate::rollout::Rollout;
use crate::workload::Manifest;

mod access;
mod fleet;
mod pg_tls;
pub mod releases;
pub(crate) mod sql;
mod workloads;

use sql::{args, Db};
pub use sql::{FleetKeys, Replica};

pub use releases::AgentRelease;

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
    // 9: event names (`device.offline`) and webhooks (their signing secret
    // encrypted with the secrets key; tenant '' = fleet-wide).
    "ALTER TABLE events ADD COLUMN name TEXT NOT NULL DEFAULT '';
    CREATE TABLE webhooks (
        id TEXT PRIMARY KEY NOT NULL,
        tenant TEXT NOT NULL,
        url TEXT NOT NULL,
        events TEXT NOT NULL,
        secret BLOB NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;",
    // 10: agent builds published for self-update (one per version and
    // architecture; `seq` numbers versions in publishing order), and agent
    // upgrades (the last one is in force; JSON `upgrade::AgentRollout`).
    "CREATE TABLE agent_releases (
        version TEXT NOT NULL,
        arch TEXT NOT NULL,
        seq INTEGER NOT NULL,
        digest BLOB NOT NULL,
        size INTEGER NOT NULL,
        data BLOB NOT NULL,
        published_at INTEGER NOT NULL,
        PRIMARY KEY (version, arch)
    ) STRICT;
    CREATE INDEX agent_releases_digest ON agent_releases (digest);
    CREATE TABLE agent_rollouts (
        id INTEGER PRIMARY KEY NOT NULL,
        doc TEXT NOT NULL
    ) STRICT;",
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

/// A webhook as stored (its secret encrypted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWebhook {
    pub id: String,
    /// '' = fleet-wide.
    pub tenant: String,
    pub url: String,
    pub events: Vec<String>,
    pub secret: Vec<u8>,
    pub created_at: u64,
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
    Sql(String),
    /// The database cannot be reached now (nothing of the request was stored).
    #[error("the store is unavailable: {0}; nothing was stored, try again")]
    Unavailable(String),
    #[error("another controller holds the store at {0}")]
    InUse(String),
    #[error(
        "this controller's keys are not the fleet's: it signs with {} (secrets key {}), the store's first controller with {} (secrets key {}); \
         give every controller of one store the same --signing-key and --secrets-key files",
        mine.signing, mine.secrets_digest, fleet.signing, fleet.secrets_digest
    )]
    OtherKeys { mine: sql::FleetKeys, fleet: sql::FleetKeys },
    #[error("{0}")]
    Unsupported(&'static str),
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
            _ => StoreError::Sql(e.to_string()),
        }
    }
}

/// Writes that land together or not at all: dropped without `commit`, none of them did.
pub struct Batch<'a>(sql::Tx<'a>);

impl Batch<'_> {
    pub fn commit(self) -> Result<(), StoreError> {
        self.0.commit()
    }
}

/// Where a store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreAt {
    /// A SQLite file (the default: `baton.db` in the data dir).
    Sqlite(PathBuf),
    /// A PostgreSQL database, by connection URL (`postgres://user:pw@host/db`).
    Postgres(String),
}

impl StoreAt {
    /// `--store`: a `postgres://` (or `postgresql://`) URL; `sqlite` or
    /// nothing is the file in the data dir.
    pub fn parse(arg: Option<&str>, data_dir: &Path) -> Result<Self, String> {
        match arg {
            None | Some("sqlite") => Ok(StoreAt::Sqlite(data_dir.join("baton.db"))),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(StoreAt::Postgres(url.to_owned()))
            }
            Some(other) => {
                // Never echoed whole: it may hold a password.
                let shown = if other.contains("://") { sql::redact(other) } else { "(not a URL)".to_string() };
                Err(format!(
                    "--store {shown}: expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE, or sqlite (the default: baton.db in the data dir)"
                ))
            }
        }
    }
}

/// The database holds workload specs (their environment), events and
/// hashes: readable by its owner only. A new file is made 0600 (SQLite
/// makes its -wal and -shm with the database's mode), an existing one and
/// its side files are brought to 0600.
fn owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if !path.exists() {
        std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(path)?;
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        match std::fs::metadata(&file) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?
            }
            _ => {}
        }
    }
    Ok(())
}

pub struct Store {
    db: Db,
    /// The SQLite file (backups are written beside it first); None on PostgreSQL.
    path: Option<PathBuf>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open { path: path.display().to_string(), source };
        owner_only(path)
            .map_err(|e| StoreError::Sql(format!("database {}: cannot make it owner-only: {e}", path.display())))?;
        let conn = Connection::open(path).map_err(open_err)?;
        // WAL: readers never block the ingest writer; NORMAL is durable across
        // process crashes, and at worst loses the last commit on power loss.
        conn.pragma_update(None, "journal_mode", "WAL").map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(open_err)?;
        let store = Self { db: Db::sqlite(conn), path: Some(path.to_path_buf()) };
        store.migrate(&path.display().to_string())?;
        Ok(store)
    }

    /// Opens (and migrates) the store wherever it lives; refused when
    /// another controller holds a PostgreSQL store.
    pub fn open_at(at: &StoreAt) -> Result<Self, StoreError> {
        Self::open_as(at, false, None, sql::Replica::default())
    }

    /// As `open_at`, but a controller that finds a PostgreSQL store held by
    /// another stands by: it returns once that one's session has ended and
    /// this one holds the store (a SQLite store is held by the data dir's lock).
    /// `fleet`: this controller's keys; on PostgreSQL they must be those the
    /// store's first controller recorded (checked before standing by).
    /// `replica`: where this one's API is reached (recorded while it leads)
    /// and, while it stands by, where the leader's is.
    pub fn open_leading(
        at: &StoreAt,
        fleet: Option<sql::FleetKeys>,
        replica: sql::Replica,
    ) -> Result<Self, StoreError> {
        Self::open_as(at, true, fleet, replica)
    }

    fn open_as(
        at: &StoreAt,
        standby: bool,
        fleet: Option<sql::FleetKeys>,
        replica: sql::Replica,
    ) -> Result<Self, StoreError> {
        match at {
            StoreAt::Sqlite(path) => Self::open(path),
            StoreAt::Postgres(url) => {
                let store = Self { db: Db::postgres(url, standby, fleet, replica)?, path: None };
                store.migrate("the PostgreSQL store")?;
                Ok(store)
            }
        }
    }

    /// Whether this controller holds its store now: false while a
    /// PostgreSQL session is lost (nothing may be published then that was
    /// not stored; see `sql.rs`).
    pub fn acting_flag(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.db.acting_flag()
    }

    /// Whether this controller stood by before it got its store.
    pub fn took_over(&self) -> bool {
        self.db.took_over()
    }

    /// Starts writes that must all land or none: every write through this
    /// store until the batch is committed belongs to it.
    pub fn batch(&self) -> Result<Batch<'_>, StoreError> {
        Ok(Batch(self.db.begin()?))
    }

    /// A consistent copy of the whole database, taken while it serves
    /// (SQLite's `VACUUM INTO`: one read transaction, so no half-done apply is
    /// in it). Restoring it is copying it over `baton.db` of a stopped controller.
    pub fn backup(&self) -> Result<Vec<u8>, StoreError> {
        let (Some(path), Some(conn)) = (&self.path, self.db.sqlite_conn()) else {
            return Err(StoreError::Unsupported(
                "a PostgreSQL store is backed up with PostgreSQL's own tools (pg_dump, or its base backups); baton backup copies SQLite stores",
            ));
        };
        let copy = path.with_extension(format!("backup-{}", std::process::id()));
        let _ = std::fs::remove_file(&copy);
        let io = |source: std::io::Error| StoreError::Backup { path: copy.display().to_string(), source };
        let taken = conn.execute("VACUUM INTO ?1", [copy.display().to_string()]);
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
        self.db.schema_version()
    }

    fn migrate(&self, what: &str) -> Result<(), StoreError> {
        let found = self.schema_version()?;
        if found > MIGRATIONS.len() {
            return Err(StoreError::TooNew { path: what.to_owned(), found, known: MIGRATIONS.len() });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found) {
            let tx = self.db.begin()?;
            self.db.migrate_to(i + 1, sql)?;
            tx.commit()?;
            tracing::info!(version = i + 1, "applied store migration");
        }
        Ok(())
    }

    fn json<T: serde::Serialize>(id: &str, v: &T) -> Result<String, StoreError> {
        serde_json::to_string(v).map_err(|source| StoreError::Corrupt { id: id.into(), source })
    }

    /// The secret called `name` (every secret when `None`), latest versions.
    fn secrets_named(&self, name: Option<&str>) -> Result<Vec<StoredSecret>, StoreError> {
        let rows = self.db.query(
            "SELECT name, MAX(version), MAX(created_at), MAX(tenant) FROM secrets WHERE CAST(?1 AS TEXT) IS NULL OR name = ?1
             GROUP BY name ORDER BY name",
            args![name],
        )?;
        rows.into_iter()
            .map(|mut r| {
                Ok(StoredSecret {
                    name: r.text(0)?,
                    version: r.int(1)? as u64,
                    updated_at: r.int(2)? as u64,
                    tenant: r.text(3)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
