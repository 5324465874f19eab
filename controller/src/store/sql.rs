//! The two databases a store lives in, behind one small interface: SQLite
//! (the default: `baton.db` in the data dir) and PostgreSQL (`--store
//! postgres://…`). Queries are written once, in the SQL both speak, with
//! `?N` placeholders (rendered `$N` for PostgreSQL); migrations once, in
//! SQLite's types (rendered by `postgres_ddl`). Values cross as `Value`
//! (integer, text, bytes, null), which is all the store keeps.
//!
//! PostgreSQL is spoken through the synchronous `postgres` client on a thread
//! of its own (`Postgres`): that client runs its own runtime and must not be
//! called from the controller's async workers, which do call the store. The
//! thread reconnects when the server went away (once per call outside a
//! transaction; inside one, the transaction fails as a whole and is never
//! continued on a new connection) and holds a session advisory lock, so two
//! controllers never act on one store: a second one is refused, or (the
//! server's `open_leading`) stands by until the first one's session ends and
//! then takes over; one that finds its lock taken after a lost connection exits.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::StoreError;

/// One SQL value as the store uses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Blob(v.to_vec())
    }
}
impl From<&Vec<u8>> for Value {
    fn from(v: &Vec<u8>) -> Self {
        Value::Blob(v.clone())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// The arguments of one statement, each converted by `Value::from`.
macro_rules! args {
    ($($v:expr),* $(,)?) => { vec![$($crate::store::sql::Value::from($v)),*] };
}
pub(crate) use args;

/// One result row; columns are taken out by position.
#[derive(Debug)]
pub struct Row(Vec<Value>);

impl Row {
    fn take(&mut self, i: usize) -> Value {
        self.0.get_mut(i).map(|v| std::mem::replace(v, Value::Null)).unwrap_or(Value::Null)
    }

    fn mismatch(i: usize, want: &str, found: &Value) -> StoreError {
        let found = match found {
            Value::Null => "null",
            Value::Int(_) => "an integer",
            Value::Text(_) => "text",
            Value::Blob(_) => "bytes",
        };
        StoreError::Sql(format!("column {i} is {found} where {want} was expected"))
    }

    pub fn int(&mut self, i: usize) -> Result<i64, StoreError> {
        match self.take(i) {
            Value::Int(v) => Ok(v),
            other => Err(Self::mismatch(i, "an integer", &other)),
        }
    }

    pub fn text(&mut self, i: usize) -> Result<String, StoreError> {
        match self.take(i) {
            Value::Text(v) => Ok(v),
            other => Err(Self::mismatch(i, "text", &other)),
        }
    }

    pub fn blob(&mut self, i: usize) -> Result<Vec<u8>, StoreError> {
        match self.take(i) {
            Value::Blob(v) => Ok(v),
            other => Err(Self::mismatch(i, "bytes", &other)),
        }
    }

    pub fn opt_blob(&mut self, i: usize) -> Result<Option<Vec<u8>>, StoreError> {
        match self.take(i) {
            Value::Null => Ok(None),
            Value::Blob(v) => Ok(Some(v)),
            other => Err(Self::mismatch(i, "bytes or null", &other)),
        }
    }
}

/// A database connection of either kind, and how deep the open transactions are.
pub struct Db {
    kind: Kind,
    depth: Cell<u32>,
}

enum Kind {
    Sqlite(rusqlite::Connection),
    Postgres(Postgres),
}

impl Db {
    pub fn sqlite(conn: rusqlite::Connection) -> Self {
        conn.set_prepared_statement_cache_capacity(64);
        Db { kind: Kind::Sqlite(conn), depth: Cell::new(0) }
    }

    /// `standby`: wait for another controller's hold on the store to end.
    /// `fleet`: this controller's keys, checked against those the store
    /// recorded (see `Session::client`). `replica`: where this one's API is
    /// reached, and where it learns the leader's while it stands by.
    pub fn postgres(url: &str, standby: bool, fleet: Option<FleetKeys>, replica: Replica) -> Result<Self, StoreError> {
        Ok(Db { kind: Kind::Postgres(Postgres::connect(url, standby, fleet, replica)?), depth: Cell::new(0) })
    }

    /// Whether this controller holds its store now (PostgreSQL: false while
    /// its session is lost; SQLite: always).
    pub fn acting_flag(&self) -> Arc<AtomicBool> {
        match &self.kind {
            Kind::Sqlite(_) => Arc::new(AtomicBool::new(true)),
            Kind::Postgres(p) => p.connected.clone(),
        }
    }

    /// Whether this controller stood by before it got its store.
    pub fn took_over(&self) -> bool {
        matches!(&self.kind, Kind::Postgres(p) if p.took_over)
    }

    /// The SQLite connection (for what only SQLite does: backups, blob reads).
    pub fn sqlite_conn(&self) -> Option<&rusqlite::Connection> {
        match &self.kind {
            Kind::Sqlite(c) => Some(c),
            Kind::Postgres(_) => None,
        }
    }

    /// Runs one statement; how many rows it changed.
    pub fn execute(&self, sql: &str, args: Vec<Value>) -> Result<usize, StoreError> {
        match &self.kind {
            Kind::Sqlite(c) => Ok(c.prepare_cached(sql)?.execute(rusqlite::params_from_iter(args.iter()))?),
            Kind::Postgres(p) => p.execute(placeholders(sql), args).map(|n| n as usize),
        }
    }

    /// Every row a query answers.
    pub fn query(&self, sql: &str, args: Vec<Value>) -> Result<Vec<Row>, StoreError> {
        match &self.kind {
            Kind::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let width = stmt.column_count();
                let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
                    (0..width).map(|i| r.get_ref(i).map(from_sqlite)).collect::<Result<Vec<_>, _>>().map(Row)
                })?;
                Ok(rows.collect::<Result<_, _>>()?)
            }
            Kind::Postgres(p) => p.query(placeholders(sql), args),
        }
    }

    /// The first row a query answers, if any.
    pub fn query_opt(&self, sql: &str, args: Vec<Value>) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// Starts writes that land together: a transaction, or a savepoint inside one.
    pub fn begin(&self) -> Result<Tx<'_>, StoreError> {
        let depth = self.depth.get();
        self.control(&if depth == 0 { "BEGIN".to_owned() } else { format!("SAVEPOINT baton_{depth}") })?;
        self.depth.set(depth + 1);
        Ok(Tx { db: self, depth, done: false })
    }

    fn control(&self, sql: &str) -> Result<(), StoreError> {
        match &self.kind {
            Kind::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Kind::Postgres(p) => p.batch(sql.to_owned()),
        }
    }

    /// How far the schema has come (0: empty database).
    pub fn schema_version(&self) -> Result<usize, StoreError> {
        match &self.kind {
            Kind::Sqlite(c) => Ok(c.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize),
            Kind::Postgres(p) => {
                p.batch("CREATE TABLE IF NOT EXISTS baton_schema (version BIGINT NOT NULL)".into())?;
                let mut rows = p.query("SELECT COALESCE(MAX(version), 0) FROM baton_schema".into(), vec![])?;
                Ok(rows.first_mut().map(|r| r.int(0)).transpose()?.unwrap_or(0) as usize)
            }
        }
    }

    /// Applies migration `version` (its SQLite text) inside the open transaction.
    pub fn migrate_to(&self, version: usize, sql: &str) -> Result<(), StoreError> {
        match &self.kind {
            Kind::Sqlite(c) => {
                c.execute_batch(sql)?;
                Ok(c.pragma_update(None, "user_version", version as i64)?)
            }
            Kind::Postgres(p) => {
                p.batch(postgres_ddl(sql))?;
                p.batch(format!("DELETE FROM baton_schema; INSERT INTO baton_schema (version) VALUES ({version})"))
            }
        }
    }
}

/// A transaction (or savepoint) in progress: dropped without `commit`,
/// none of its writes land.
pub struct Tx<'a> {
    db: &'a Db,
    depth: u32,
    done: bool,
}

impl Tx<'_> {
    pub fn commit(mut self) -> Result<(), StoreError> {
        let sql = if self.depth == 0 { "COMMIT".to_owned() } else { format!("RELEASE SAVEPOINT baton_{}", self.depth) };
        self.db.control(&sql)?;
        self.done = true;
        self.db.depth.set(self.depth);
        Ok(())
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let sql = if self.depth == 0 {
            "ROLLBACK".to_owned()
        } else {
            format!("ROLLBACK TO SAVEPOINT baton_{0}; RELEASE SAVEPOINT baton_{0}", self.depth)
        };
        if let Err(e) = self.db.control(&sql) {
            tracing::warn!(error = %e, "rolling back a store transaction failed");
        }
        self.db.depth.set(self.depth);
    }
}

fn from_sqlite(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        // The store writes no REAL; should one appear, it is read as its integer part.
        ValueRef::Real(f) => Value::Int(f as i64),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Text(t) => ValueRef::Text(t.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// `?N` → `$N`: the same query for PostgreSQL.
pub fn placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

/// A migration written for SQLite, in PostgreSQL's types: 64-bit integers
/// (SQLite's are), `BYTEA` for blobs, a sequence for the autoincrementing
/// key, no `STRICT` (PostgreSQL's columns always are).
pub fn postgres_ddl(sql: &str) -> String {
    sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
        .replace("INTEGER", "BIGINT")
        .replace("BLOB", "BYTEA")
        .replace(") STRICT;", ");")
}

/// The session-level advisory lock a controller holds on its PostgreSQL store ("baton").
const STORE_LOCK: i64 = 0x0062_6174_6f6e;

type Job = Box<dyn FnOnce(&mut Session) + Send>;

/// How often an idle leader checks that it still holds its store (and
/// renews its lease).
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// A leader that has not renewed its lease for this long (by the
/// database's clock) is taken for frozen — a stopped process, a hung
/// machine whose kernel still answers TCP keepalives, so its session and
/// lock never end — and a standby ends its session.
const LEASE: Duration = Duration::from_secs(10);

/// How long a standby waits on the lock before it looks at the leader's lease.
const LEASE_CHECK_EVERY: Duration = Duration::from_secs(2);

/// What the replicas of one store tell each other through it: the leader
/// records where its API is reached (`baton_leader.api`), and a standby
/// reads it while it waits, to forward the API requests it gets there.
#[derive(Debug, Clone, Default)]
pub struct Replica {
    /// This controller's API address as the others reach it (HOST:PORT).
    pub api: Option<String>,
    /// The leader's, as last read while standing by (None: not known).
    pub leader_api: Arc<std::sync::Mutex<Option<String>>>,
}

/// A PostgreSQL connection served by a thread of its own.
struct Postgres {
    jobs: std::sync::mpsc::Sender<Job>,
    /// The session is up and holds the store (false while reconnecting).
    connected: Arc<AtomicBool>,
    /// This controller stood by before it got the store.
    took_over: bool,
}

impl Postgres {
    /// `standby`: when another controller holds the store, wait until its
    /// session ends and take over (else: refuse).
    fn connect(url: &str, standby: bool, fleet: Option<FleetKeys>, replica: Replica) -> Result<Self, StoreError> {
        let (parsed, files) = super::pg_tls::split_url(url);
        let mut config: postgres::Config =
            parsed.parse().map_err(|e| StoreError::Sql(format!("--store {}: {e}", redact(url))))?;
        // TLS when asked for, the server's certificate always checked;
        // otherwise plain (the client's default `prefer` cannot be honoured
        // without checking certificates nobody configured).
        let tls = if config.get_ssl_mode() == postgres::config::SslMode::Require {
            let tls = super::pg_tls::client_identity(&files)
                .and_then(|identity| {
                    crate::tls::client_config(files.root.as_deref().map(std::path::Path::new), "sslrootcert", identity)
                })
                .map_err(|e| StoreError::Sql(format!("--store {}: {e:#}", redact(url))))?;
            Some(super::pg_tls::Rustls(Arc::new(tls)))
        } else if files.any() {
            return Err(StoreError::Sql(format!(
                "--store {}: sslrootcert, sslcert and sslkey are used with sslmode=require (or verify-ca, verify-full) only: add it, \
                 or this controller would speak to PostgreSQL in the clear",
                redact(url)
            )));
        } else {
            None
        };
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.application_name("baton-controller");
        // A dead or unreachable PostgreSQL is noticed in seconds, not hours
        // (keepalives while idle; a write that is never acknowledged, too).
        config.keepalives_idle(Duration::from_secs(5));
        config.keepalives_interval(Duration::from_secs(2));
        config.keepalives_retries(3);
        config.tcp_user_timeout(Duration::from_secs(10));
        let connected = Arc::new(AtomicBool::new(false));
        let mut session = Session {
            config,
            url: redact(url),
            client: None,
            statements: Statements(HashMap::new()),
            lost_in_tx: false,
            in_tx: false,
            standby,
            waited: false,
            led: false,
            epoch: 0,
            connected: connected.clone(),
            fleet,
            replica,
            tls,
        };
        // The first connection and the lock, before anything is served. A
        // standby that loses its connection while it waits connects again.
        // A standby waits 3 s before trying again, so that after a
        // PostgreSQL restart the leader (which tries every second) keeps the store.
        let mut wait = Duration::from_secs(3);
        loop {
            let outcome = session.client().map(|_| ());
            match outcome {
                Ok(()) => break,
                Err(e) if session.standby && session.waited => {
                    tracing::warn!(error = %e, retry_in_s = wait.as_secs(), "standing by: lost PostgreSQL while waiting for the store");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e),
            }
        }
        let took_over = session.waited;
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("store-postgres".into())
            .spawn(move || {
                // Between jobs, and at least every second, the session is
                // checked: a leader learns that it lost the store at once,
                // not at its next write.
                let mut checked = Instant::now();
                loop {
                    match rx.recv_timeout(WATCH_EVERY) {
                        Ok(job) => job(&mut session),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    if checked.elapsed() >= WATCH_EVERY {
                        session.watch();
                        checked = Instant::now();
                    }
                }
            })
            .map_err(|e| StoreError::Sql(format!("cannot start the PostgreSQL thread: {e}")))?;
        Ok(Postgres { jobs, connected, took_over })
    }

    fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Session) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let gone = || StoreError::Sql("the PostgreSQL thread is gone".into());
        self.jobs.send(Box::new(move |s| drop(tx.send(f(s))))).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }

    fn execute(&self, sql: String, args: Vec<Value>) -> Result<u64, StoreError> {
        self.run(move |s| {
            s.retrying(|c, st| {
                let stmt = st.prepare(c, &sql)?;
                c.execute(&stmt, &refs(&args)).map_err(pg_error)
            })
        })
    }

    fn query(&self, sql: String, args: Vec<Value>) -> Result<Vec<Row>, StoreError> {
        self.run(move |s| {
            let rows = s.retrying(|c, st| {
                let stmt = st.prepare(c, &sql)?;
                c.query(&stmt, &refs(&args)).map_err(pg_error)
            })?;
            rows.iter()
                .map(|r| {
                    (0..r.len()).map(|i| r.try_get::<_, Value>(i).map_err(pg_error)).collect::<Result<_, _>>().map(Row)
                })
                .collect()
        })
    }

    fn batch(&self, sql: String) -> Result<(), StoreError> {
        self.run(move |s| s.control(&sql))
    }
}

/// A standby's wait for the store's lock: every `LEASE_CHECK_EVERY` it
/// looks at the leader's lease, and ends the session of a leader that has
/// not renewed it for `LEASE` (frozen: see there), which frees the lock.
/// That leader, if it ever runs again, finds its session gone and another
/// epoch in the store, and exits (`fence`).
fn wait_for_lock(
    c: &mut postgres::Client,
    url: &str,
    leader_api: &std::sync::Mutex<Option<String>>,
) -> Result<(), StoreError> {
    c.batch_execute(&format!("SET lock_timeout = {}", LEASE_CHECK_EVERY.as_millis())).map_err(pg_error)?;
    loop {
        // Where the leader's API is.
        let api = lease_row(c.query_opt("SELECT api FROM baton_leader WHERE id = 1", &[]))?
            .and_then(|r| r.get::<_, Option<String>>(0));
        if let Ok(mut known) = leader_api.lock() {
            *known = api;
        }
        match c.query_one("SELECT pg_advisory_lock($1)", &[&STORE_LOCK]) {
            Ok(_) if leader_may_return(c)? => {
                c.query_one("SELECT pg_advisory_unlock($1)", &[&STORE_LOCK]).map_err(pg_error)?;
                tracing::debug!(store = %url, "the leading controller's lease is still fresh, and it was renewed before PostgreSQL started: leaving it the store");
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            Ok(_) => break,
            Err(e) if e.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {}
            Err(e) => return Err(pg_error(e)),
        }
        // The lease counts only while the session that wrote it holds the
        // lock (a leader that just took the lock has not written its own yet).
        let stale = c.query_opt(
            "SELECT l.pid, EXTRACT(EPOCH FROM now() - b.renewed_at)::float8 FROM baton_leader b
             JOIN pg_locks l ON l.pid = b.backend_pid
             WHERE b.id = 1 AND l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
               AND l.classid::bigint = $1 AND l.objid::bigint = $2 AND b.renewed_at < now() - make_interval(secs => $3)",
            &[&(STORE_LOCK >> 32), &(STORE_LOCK & 0xffff_ffff), &LEASE.as_secs_f64()],
        );
        if let Some(row) = lease_row(stale)? {
            let (pid, age): (i32, f64) = (row.get(0), row.get(1));
            tracing::warn!(store = %url, backend_pid = pid, lease_age_s = age.round(),
                "the leading controller has not renewed its lease (frozen?): ending its database session to take over");
            c.query_one("SELECT pg_terminate_backend($1)", &[&pid]).map_err(pg_error)?;
        }
    }
    c.batch_execute("SET lock_timeout = 0").map_err(pg_error)
}

/// Whether the store's lock, just taken, was free only because PostgreSQL
/// restarted under a leader that may still come back: its lease was renewed
/// before the server started and has not lapsed. A standby then leaves it
/// the store until the lease lapses (a leader killed with the server is
/// replaced then); a leader whose own session ended (killed, cut off) is
/// replaced at once, as before.
fn leader_may_return(c: &mut postgres::Client) -> Result<bool, StoreError> {
    let row = c.query_opt(
        "SELECT renewed_at > now() - make_interval(secs => $1) AND renewed_at < pg_postmaster_start_time()
         FROM baton_leader WHERE id = 1",
        &[&LEASE.as_secs_f64()],
    );
    Ok(lease_row(row)?.and_then(|r| r.get::<_, Option<bool>>(0)).unwrap_or(false))
}

/// A row of `baton_leader`, as a query found it; none in a store made before
/// leases (no such table or column yet).
fn lease_row(row: Result<Option<postgres::Row>, postgres::Error>) -> Result<Option<postgres::Row>, StoreError> {
    match row {
        Ok(row) => Ok(row),
        Err(e) if e.code() == Some(&postgres::error::SqlState::UNDEFINED_COLUMN) => Ok(None),
        Err(e) if e.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) => Ok(None),
        Err(e) => Err(pg_error(e)),
    }
}

/// A leader back after an outage takes its lock again, waiting up to a
/// lease for a standby that holds it a moment (see `leader_may_return`);
/// false when another controller led meanwhile (its epoch is in the store)
/// or the lock stayed taken.
fn reclaim(c: &mut postgres::Client, epoch: i64) -> Result<bool, StoreError> {
    let since = Instant::now();
    c.batch_execute("SET lock_timeout = 1000").map_err(pg_error)?;
    let held = loop {
        match c.query_one("SELECT pg_advisory_lock($1)", &[&STORE_LOCK]) {
            Ok(_) => break true,
            Err(e) if e.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {}
            Err(e) => return Err(pg_error(e)),
        }
        let current = c.query_opt("SELECT epoch FROM baton_leader WHERE id = 1", &[]).map_err(pg_error)?;
        if current.is_some_and(|r| r.get::<_, i64>(0) != epoch) || since.elapsed() > LEASE {
            break false;
        }
    };
    c.batch_execute("SET lock_timeout = 0").map_err(pg_error)?;
    Ok(held)
}

/// Fencing: a controller that is no longer the store's leader stops at
/// once (exit status 3, for its supervisor to start it again as a standby),
/// so that two never act on one fleet.
fn fence(url: &str, why: &str) -> ! {
    tracing::error!(store = %url, "{why}: exiting, so that only one controller acts on the fleet");
    std::process::exit(3);
}

fn refs(args: &[Value]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    args.iter().map(|a| a as &(dyn postgres::types::ToSql + Sync)).collect()
}

/// The URL without its password (in the user part or as a `password=`
/// parameter), for messages.
pub fn redact(url: &str) -> String {
    let url = match url.find("password=") {
        Some(at) => {
            let value_end = url[at..].find('&').map_or(url.len(), |e| at + e);
            format!("{}password=***{}", &url[..at], &url[value_end..])
        }
        None => url.to_owned(),
    };
    let url = url.as_str();
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// What went wrong, with its cause: the server's own message when it sent
/// one ("password authentication failed for user …"), else the chain of
/// causes ("invalid configuration: password missing").
fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out = format!("{out}: {c}");
        cause = c.source();
    }
    out
}

fn pg_error(e: postgres::Error) -> StoreError {
    if e.is_closed() {
        return StoreError::Unavailable(format!("PostgreSQL: {}", describe(&e)));
    }
    if e.code() == Some(&postgres::error::SqlState::DISK_FULL) {
        return StoreError::Full;
    }
    match e.as_db_error() {
        Some(db) => StoreError::Sql(format!("PostgreSQL: {}", db.message())),
        None => StoreError::Sql(format!("PostgreSQL: {e}")),
    }
}

/// Prepared statements of the current connection, by text.
struct Statements(HashMap<String, postgres::Statement>);

impl Statements {
    fn prepare(&mut self, c: &mut postgres::Client, sql: &str) -> Result<postgres::Statement, StoreError> {
        if let Some(s) = self.0.get(sql) {
            return Ok(s.clone());
        }
        let s = c.prepare(sql).map_err(pg_error)?;
        self.0.insert(sql.to_owned(), s.clone());
        Ok(s)
    }
}

/// The connection thread's state.
struct Session {
    config: postgres::Config,
    url: String,
    client: Option<postgres::Client>,
    /// Prepared on `client`; forgotten with it.
    statements: Statements,
    /// A transaction is open on the server.
    in_tx: bool,
    /// The connection went away inside a transaction: everything until its
    /// end fails, so none of it lands half (or on a new connection).
    lost_in_tx: bool,
    /// Wait for the store's lock rather than refuse.
    standby: bool,
    /// Has waited for the lock (so a lost connection is retried).
    waited: bool,
    /// Has held the store's lock: finding it taken now means another
    /// controller took over while this one's connection was down.
    led: bool,
    /// The leadership epoch this controller got with the lock (`baton_leader`).
    epoch: i64,
    connected: Arc<AtomicBool>,
    /// This controller's keys, to compare with the fleet's.
    fleet: Option<FleetKeys>,
    replica: Replica,
    /// With `sslmode=require`: TLS, the server's certificate checked.
    tls: Option<super::pg_tls::Rustls>,
}

/// What identifies a fleet's keys without revealing them: the signing key's
/// public half and a digest of the secrets key. Every controller of one
/// store must have the same (devices trust the signing key; secrets are
/// sealed with the other).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetKeys {
    pub signing: String,
    pub secrets_digest: String,
}

impl Session {
    /// The live connection, made (and the store's lock taken) when there is none.
    fn client(&mut self) -> Result<&mut postgres::Client, StoreError> {
        if self.client.as_ref().is_some_and(postgres::Client::is_closed) {
            self.client = None;
            self.statements.0.clear();
        }
        if self.client.is_none() {
            let connected = match &self.tls {
                Some(tls) => self.config.connect(tls.clone()),
                None => self.config.connect(postgres::NoTls),
            };
            let mut c = connected.map_err(|e| {
                StoreError::Unavailable(format!("cannot reach PostgreSQL at {}: {}", self.url, describe(&e)))
            })?;
            // The server drops a dead controller's session (and its lock) in
            // ~11 s even when its machine vanished without closing the socket.
            c.batch_execute(
                "SET client_min_messages = warning; SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
                 SET tcp_keepalives_count = 3",
            )
            .map_err(pg_error)?;
            // Checked before standing by: a replica with other keys would
            // take over and sign documents every device refuses.
            self.check_keys(&mut c, false)?;
            let row = c.query_one("SELECT pg_try_advisory_lock($1)", &[&STORE_LOCK]).map_err(pg_error)?;
            let mut held = row.get::<_, bool>(0);
            if !held && self.led {
                // Back after PostgreSQL went away: a standby that came
                // back too may hold the lock a moment before it leaves it
                // to this leader (`leader_may_return`). Gone for good only
                // if another leader's epoch is in the store.
                held = reclaim(&mut c, self.epoch)?;
                if !held {
                    fence(&self.url, "another controller holds the store now");
                }
            }
            // The lock was free because PostgreSQL restarted under a leader
            // that may be reconnecting: leave it the store, as a standby.
            let leave = held && !self.led && self.standby && leader_may_return(&mut c)?;
            if leave {
                c.query_one("SELECT pg_advisory_unlock($1)", &[&STORE_LOCK]).map_err(pg_error)?;
            }
            if !held || leave {
                if !self.standby {
                    return Err(StoreError::InUse(self.url.clone()));
                }
                if leave {
                    tracing::warn!(store = %self.url, "PostgreSQL restarted under the leading controller, whose lease is still fresh: standing by (this one takes over if it does not come back before its lease lapses)");
                } else {
                    tracing::warn!(store = %self.url, "another controller holds the store: standing by (this one takes over when that one's session ends, or its lease lapses)");
                }
                self.waited = true;
                wait_for_lock(&mut c, &self.url, &self.replica.leader_api)?;
                if let Ok(mut known) = self.replica.leader_api.lock() {
                    *known = None;
                }
                tracing::warn!(store = %self.url, "the controller that held the store is gone: taking over");
            }
            // Made under the lock: controllers starting together on an empty
            // database would otherwise race on CREATE TABLE IF NOT EXISTS.
            // The lease's columns are added to stores made before it.
            c.batch_execute(
                "CREATE TABLE IF NOT EXISTS baton_leader (id INTEGER PRIMARY KEY, epoch BIGINT NOT NULL); \
                 ALTER TABLE baton_leader ADD COLUMN IF NOT EXISTS backend_pid INTEGER; \
                 ALTER TABLE baton_leader ADD COLUMN IF NOT EXISTS renewed_at TIMESTAMPTZ; \
                 ALTER TABLE baton_leader ADD COLUMN IF NOT EXISTS api TEXT; \
                 CREATE TABLE IF NOT EXISTS baton_fleet_keys (id INTEGER PRIMARY KEY, signing TEXT NOT NULL, secrets_digest TEXT NOT NULL)",
            )
            .map_err(pg_error)?;
            if self.led {
                // Back after a lost connection: still the leader only if no
                // other controller led meanwhile; the lease is this session's now.
                let renewed = c
                    .execute(
                        "UPDATE baton_leader SET backend_pid = pg_backend_pid(), renewed_at = now(), api = $2
                         WHERE id = 1 AND epoch = $1",
                        &[&self.epoch, &self.replica.api],
                    )
                    .map_err(pg_error)?;
                if renewed != 1 {
                    fence(&self.url, "another controller led the fleet while this one's connection was down");
                }
                tracing::info!(store = %self.url, "reconnected to the PostgreSQL store, still leading");
            } else {
                let row = c
                    .query_one(
                        "INSERT INTO baton_leader (id, epoch, backend_pid, renewed_at, api) VALUES (1, 1, pg_backend_pid(), now(), $1)
                         ON CONFLICT (id) DO UPDATE SET epoch = baton_leader.epoch + 1,
                           backend_pid = pg_backend_pid(), renewed_at = now(), api = $1
                         RETURNING epoch",
                        &[&self.replica.api],
                    )
                    .map_err(pg_error)?;
                self.epoch = row.get(0);
                self.check_keys(&mut c, true)?;
                tracing::info!(store = %self.url, epoch = self.epoch, "connected to the PostgreSQL store, leading");
            }
            self.led = true;
            self.client = Some(c);
            self.connected.store(true, Ordering::Relaxed);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// This controller's keys against the fleet's, as the store recorded
    /// them; `record`: the first leader writes its own.
    fn check_keys(&self, c: &mut postgres::Client, record: bool) -> Result<(), StoreError> {
        let Some(mine) = &self.fleet else { return Ok(()) };
        let exists = c.query_one("SELECT to_regclass('baton_fleet_keys') IS NOT NULL", &[]).map_err(pg_error)?;
        if !exists.get::<_, bool>(0) {
            return Ok(()); // a new store: the first leader records its keys
        }
        let row =
            c.query_opt("SELECT signing, secrets_digest FROM baton_fleet_keys WHERE id = 1", &[]).map_err(pg_error)?;
        match row {
            Some(row) => {
                let fleet = FleetKeys { signing: row.get(0), secrets_digest: row.get(1) };
                if &fleet != mine {
                    return Err(StoreError::OtherKeys { mine: mine.clone(), fleet });
                }
            }
            None if record => {
                c.execute(
                    "INSERT INTO baton_fleet_keys (id, signing, secrets_digest) VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING",
                    &[&mine.signing, &mine.secrets_digest],
                )
                .map_err(pg_error)?;
            }
            None => {}
        }
        Ok(())
    }

    /// The idle check: a lost connection is made again now (and the
    /// leadership checked, see `client`), not at the next write.
    fn watch(&mut self) {
        if !self.led || self.lost_in_tx {
            return;
        }
        // The check renews the lease (see `LEASE`), except inside a
        // transaction, where the renewal would be seen only at its commit.
        let (epoch, in_tx) = (self.epoch, self.in_tx);
        let alive = match self.client.as_mut() {
            Some(c) if !c.is_closed() && in_tx => c.simple_query("SELECT 1").map(|_| 1).map_err(|e| describe(&e)),
            Some(c) if !c.is_closed() => c
                .execute("UPDATE baton_leader SET renewed_at = now() WHERE id = 1 AND epoch = $1", &[&epoch])
                .map_err(|e| describe(&e)),
            _ => Err("closed".to_string()),
        };
        if let Ok(renewed) = alive {
            if renewed != 1 {
                fence(&self.url, "another controller's epoch is in the store");
            }
            return;
        }
        let Err(why) = alive else { return };
        tracing::warn!(store = %self.url, why, "the PostgreSQL session is gone; connecting again");
        self.connected.store(false, Ordering::Relaxed);
        if self.in_tx {
            self.lost_in_tx = true;
            return;
        }
        self.client = None;
        self.statements.0.clear();
        if let Err(e) = self.client() {
            tracing::warn!(error = %e, "lost the PostgreSQL store; acting on nothing until it is back (trying every second)");
        }
    }

    /// Runs `f` on the connection; when the connection had gone away
    /// (outside a transaction), once more on a new one.
    fn retrying<R>(
        &mut self,
        mut f: impl FnMut(&mut postgres::Client, &mut Statements) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        if self.lost_in_tx {
            return Err(Self::lost());
        }
        for attempt in 0..2 {
            self.client()?; // (re)connected first: that forgets the old connection's statements
            let client = self.client.as_mut().expect("connected above");
            let out = f(client, &mut self.statements);
            let closed = client.is_closed();
            if closed {
                self.connected.store(false, Ordering::Relaxed);
            }
            match out {
                Err(_) if closed && self.in_tx => {
                    self.lost_in_tx = true;
                    return Err(Self::lost());
                }
                Err(_) if closed && attempt == 0 => continue,
                out => return out,
            }
        }
        unreachable!("the second attempt returns")
    }

    fn lost() -> StoreError {
        StoreError::Unavailable("the connection to PostgreSQL was lost inside a transaction".into())
    }

    /// BEGIN, COMMIT, ROLLBACK, savepoints and DDL.
    fn control(&mut self, sql: &str) -> Result<(), StoreError> {
        let ends = sql == "COMMIT" || sql.starts_with("ROLLBACK") && !sql.starts_with("ROLLBACK TO");
        if self.lost_in_tx {
            if ends {
                self.lost_in_tx = false;
                self.in_tx = false;
            }
            // A rollback of what is gone anyway succeeds; anything else fails.
            return if sql == "ROLLBACK" { Ok(()) } else { Err(Self::lost()) };
        }
        let out = self.retrying(|c, _| c.batch_execute(sql).map_err(pg_error));
        if sql == "BEGIN" && out.is_ok() {
            self.in_tx = true;
        }
        if ends {
            self.in_tx = false;
        }
        out
    }
}

impl postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::Type;
        match self {
            Value::Null => Ok(postgres::types::IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                _ => i.to_sql(ty, out),
            },
            Value::Text(t) => t.as_str().to_sql(ty, out),
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true // checked per value in `to_sql`
    }

    postgres::types::to_sql_checked!();
}

impl<'a> postgres::types::FromSql<'a> for Value {
    fn from_sql(ty: &postgres::types::Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::Type;
        Ok(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)?.into()),
            Type::BOOL => Value::Int(bool::from_sql(ty, raw)?.into()),
            Type::BYTEA => Value::Blob(Vec::<u8>::from_sql(ty, raw)?),
            _ => Value::Text(String::from_sql(ty, raw)?),
        })
    }

    fn from_sql_null(_: &postgres::types::Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Value::Null)
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_migrations_render_for_postgres() {
        assert_eq!(
            placeholders("SELECT a FROM t WHERE (?1 IS NULL OR b = ?1) AND c = ?12 AND d = '?'"),
            "SELECT a FROM t WHERE ($1 IS NULL OR b = $1) AND c = $12 AND d = '?'"
        );
        assert_eq!(
            postgres_ddl("CREATE TABLE e (id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, b BLOB) STRICT;"),
            "CREATE TABLE e (id BIGSERIAL PRIMARY KEY, at BIGINT NOT NULL, b BYTEA);"
        );
        assert_eq!(redact("postgres://baton:hunter2@db:5432/baton"), "postgres://baton:***@db:5432/baton");
        assert_eq!(redact("postgres://db/baton"), "postgres://db/baton");
        assert_eq!(redact("postgres://baton@db/baton"), "postgres://baton@db/baton");
        assert_eq!(
            redact("postgres://baton@db/baton?password=pw&sslmode=disable"),
            "postgres://baton@db/baton?password=***&sslmode=disable"
        );
        assert_eq!(redact("mysql://root:pw@db/x"), "mysql://root:***@db/x");
    }

    #[test]
    fn rows_say_which_column_is_not_what_was_asked() {
        let mut row = Row(vec![Value::Int(1), Value::Text("x".into()), Value::Null]);
        assert_eq!(row.int(0).unwrap(), 1);
        assert!(row.int(1).unwrap_err().to_string().contains("column 1 is text"));
        assert_eq!(row.opt_blob(2).unwrap(), None);
    }

    #[test]
    fn savepoints_nest_and_a_dropped_one_undoes_only_its_own() {
        let db = Db::sqlite(rusqlite::Connection::open_in_memory().unwrap());
        db.execute("CREATE TABLE t (v INTEGER)", vec![]).unwrap();
        let outer = db.begin().unwrap();
        db.execute("INSERT INTO t VALUES (?1)", args![1i64]).unwrap();
        {
            let inner = db.begin().unwrap();
            db.execute("INSERT INTO t VALUES (?1)", args![2i64]).unwrap();
            drop(inner);
        }
        let inner = db.begin().unwrap();
        db.execute("INSERT INTO t VALUES (?1)", args![3i64]).unwrap();
        inner.commit().unwrap();
        outer.commit().unwrap();
        let got: Vec<i64> = db
            .query("SELECT v FROM t ORDER BY v", vec![])
            .unwrap()
            .into_iter()
            .map(|mut r| r.int(0).unwrap())
            .collect();
        assert_eq!(got, [1, 3]);
        let dropped = db.begin().unwrap();
        db.execute("DELETE FROM t", vec![]).unwrap();
        drop(dropped);
        assert_eq!(db.query("SELECT v FROM t", vec![]).unwrap().len(), 2);
    }
}
