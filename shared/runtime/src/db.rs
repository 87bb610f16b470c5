//! Storage plumbing shared by every service: one connection URL, SQLite as the embedded default
//! and PostgreSQL for production, migrations embedded per service and per backend.
//!
//! Store code is written once against sqlx's `Any` driver: both backends accept `$1` parameters,
//! `RETURNING` and `ON CONFLICT`, and the schema keeps to types both share (settled money as
//! integer minor units in `BIGINT`, rates as decimal text, instants as `BIGINT` microseconds
//! since the epoch, ids as text). Where the dialects differ (row locks), [`Backend`] says which.
//!
//! - SQLite: a file (directories created), WAL, `busy_timeout`, foreign keys, and write
//!   transactions that start with `BEGIN IMMEDIATE`, so two writers never deadlock upgrading a
//!   read lock: the second waits for the first at `BEGIN`.
//! - PostgreSQL: each service in its own schema (created if missing) that also holds its
//!   migrations table; every connection's `search_path` is that schema. Several replicas may
//!   share the database: correctness comes from row locks and constraints, not process memory.

/// `as_str` and `parse` for an enumeration stored as text: each variant and its stored text,
/// written once, e.g. `runtime::text_enum!(Status { Active => "active", Closed => "closed" });`.
/// `parse` answers `None` for a text no variant has (the store reports such a row corrupt).
#[macro_export]
macro_rules! text_enum {
    ($ty:ty { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// The stored text.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
            /// Parses the stored text.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some(Self::$variant),)+ _ => None }
            }
        }
    };
}

use std::{str::FromStr, time::Duration};

use sqlx::{
    AnyPool, Executor, Row, Transaction,
    any::{AnyConnectOptions, AnyPoolOptions},
    migrate::{Migration, Migrator},
};

use crate::config::ServiceConfig;

/// Which database a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded default.
    Sqlite,
    /// Production.
    Postgres,
}

/// A service's migrations for both backends (`sqlx::migrate!("migrations/sqlite")`, ...).
pub struct Migrations {
    /// Applied on SQLite.
    pub sqlite: Migrator,
    /// Applied on PostgreSQL.
    pub postgres: Migrator,
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The driver failed.
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    /// Migrations failed.
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Something in the database contradicts an invariant.
    #[error("storage invariant violated: {0}")]
    Corrupt(String),
}

/// The message a call answers with `UNAVAILABLE` when storage was out of reach for a moment.
pub const STORAGE_UNAVAILABLE: &str =
    "storage is unavailable for a moment; retry with the same idempotency key";

impl DbError {
    /// Whether the failure is the database being out of reach for a moment (a connection cut,
    /// terminated or refused, the pool exhausted, a lock or serialization conflict) rather than
    /// a fault in the request or the data. The transaction did not commit, or its outcome is
    /// unknown; either way a retry with the same idempotency key completes it exactly once, so
    /// the call answers `UNAVAILABLE` (retryable) instead of `INTERNAL`.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Sqlx(e) => is_transient(e),
            DbError::Migrate(_) | DbError::Corrupt(_) => false,
        }
    }
}

/// See [`DbError::is_transient`].
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|code| {
            // PostgreSQL: class 08 (connection exception), 57P01-57P03 (terminated by an
            // administrator, crash shutdown, cannot connect now), 53300 (too many connections),
            // 40001/40P01 (serialization failure, deadlock: rolled back). SQLite: SQLITE_BUSY
            // and SQLITE_LOCKED with their extended codes.
            code.starts_with("08")
                || matches!(
                    code.as_ref(),
                    "57P01"
                        | "57P02"
                        | "57P03"
                        | "53300"
                        | "40001"
                        | "40P01"
                        | "5"
                        | "6"
                        | "261"
                        | "517"
                        | "262"
                )
        }),
        _ => false,
    }
}

/// A pool plus the backend it talks to. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    /// SQLite only: the one connection write transactions take turns on (see
    /// [`Db::begin_write`]).
    writer: Option<AnyPool>,
    backend: Backend,
}

/// The runtime's own tables (outbox, idempotency keys, relay state), migrated with each service.
static PLATFORM_SQLITE: Migrator = sqlx::migrate!("migrations/sqlite");
static PLATFORM_POSTGRES: Migrator = sqlx::migrate!("migrations/postgres");

impl Db {
    /// Connects with the service's settings and runs the platform's and the service's migrations.
    pub async fn connect(config: &ServiceConfig, migrations: &Migrations) -> Result<Db, DbError> {
        Self::connect_as(
            config.service_name,
            &config.database_url,
            &config.database_schema,
            config.database_max_connections,
            migrations,
        )
        .await
    }

    /// Connects to `url` (schema used on PostgreSQL only) and migrates.
    pub async fn connect_url(
        url: &str,
        schema: &str,
        max_connections: u32,
        migrations: &Migrations,
    ) -> Result<Db, DbError> {
        Self::connect_as("billing", url, schema, max_connections, migrations).await
    }

    /// Like [`Db::connect_url`], naming the connections on PostgreSQL: their
    /// `application_name` is [`application_name`]`(service, schema)`, so an operator (or a
    /// test) can tell which service's connections are which in `pg_stat_activity`.
    pub async fn connect_as(
        service: &str,
        url: &str,
        schema: &str,
        max_connections: u32,
        migrations: &Migrations,
    ) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let db = if url.starts_with("sqlite:") {
            Self::connect_sqlite(url, max_connections).await?
        } else {
            let name = application_name(service, schema);
            Self::connect_postgres(url, schema, &name, max_connections).await?
        };
        let (platform, own) = match db.backend {
            Backend::Sqlite => (&PLATFORM_SQLITE, &migrations.sqlite),
            Backend::Postgres => (&PLATFORM_POSTGRES, &migrations.postgres),
        };
        combined(platform, own).run(&db.pool).await?;
        Ok(db)
    }

    async fn connect_sqlite(url: &str, max_connections: u32) -> Result<Db, DbError> {
        let path = url
            .trim_start_matches("sqlite://")
            .trim_start_matches("sqlite:");
        let path = path.split('?').next().unwrap_or(path);
        if path != ":memory:"
            && let Some(dir) = std::path::Path::new(path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(sqlx::Error::Io)?;
        }
        let url = if url.contains("mode=") {
            url.to_string()
        } else if url.contains('?') {
            format!("{url}&mode=rwc")
        } else {
            format!("{url}?mode=rwc")
        };
        let options = AnyConnectOptions::from_str(&url)?;
        // Page cache per connection, in KiB: SQLite's default (2 MiB) for the writer, whose
        // batches revisit the same pages; a quarter of it for each reader, which the kernel's
        // page cache serves as well. Ten readers at 2 MiB each came to 20 MiB of a process's
        // memory once the database outgrew them (the subscription at 100,000 subscriptions).
        //
        // `wal_autocheckpoint`, in pages: the writer of a file database leaves copying the WAL
        // into the database file to [`Db::checkpoint`], run in the background on a reader, so
        // that no commit pays for it; it checkpoints itself only when the WAL has grown to
        // [`WRITER_AUTOCHECKPOINT`] pages (the background one not keeping up). SQLite's
        // default, 1,000 pages, stays for the rest.
        let pool_of = |size: u32, cache_kib: u32, autocheckpoint: u32| {
            let pragmas = format!(
                "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 10000; \
                 PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL; \
                 PRAGMA cache_size = -{cache_kib}; \
                 PRAGMA wal_autocheckpoint = {autocheckpoint};"
            );
            AnyPoolOptions::new()
                .max_connections(size)
                .acquire_timeout(Duration::from_secs(30))
                .after_connect(move |conn, _| {
                    let pragmas = pragmas.clone();
                    Box::pin(async move {
                        conn.execute(pragmas.as_str()).await?;
                        Ok(())
                    })
                })
        };
        // An in-memory database exists once per connection: it cannot have a second pool, and
        // its one pool also writes.
        let in_memory = path == ":memory:";
        let pool = pool_of(
            max_connections,
            if in_memory { 2000 } else { 512 },
            SQLITE_AUTOCHECKPOINT,
        )
        .connect_with(options.clone())
        .await?;
        let writer = if in_memory {
            None
        } else {
            Some(
                pool_of(1, 2000, WRITER_AUTOCHECKPOINT)
                    .connect_with(options)
                    .await?,
            )
        };
        Ok(Db {
            pool,
            writer,
            backend: Backend::Sqlite,
        })
    }

    async fn connect_postgres(
        url: &str,
        schema: &str,
        application_name: &str,
        max_connections: u32,
    ) -> Result<Db, DbError> {
        let options = AnyConnectOptions::from_str(&with_statement_cache(url))?;
        // The schema must exist before a connection can make it its search_path. Replicas may
        // race here: a duplicate-schema error from the loser means the schema is there.
        {
            let setup = AnyPoolOptions::new()
                .max_connections(1)
                .connect_with(options.clone())
                .await?;
            if let Err(e) = setup
                .execute(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"").as_str())
                .await
            {
                let duplicate = e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| c == "23505" || c == "42P06");
                if !duplicate {
                    return Err(e.into());
                }
            }
            setup.close().await;
        }
        // The schema is a validated identifier and the service name a constant, so both are
        // safe to splice; application_name is cut by PostgreSQL at 63 bytes.
        let set_path = format!(
            "SET search_path TO \"{schema}\"; SET application_name TO '{}'",
            application_name.replace('\'', "")
        );
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                let set_path = set_path.clone();
                Box::pin(async move {
                    conn.execute(set_path.as_str()).await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        Ok(Db {
            pool,
            writer: None,
            backend: Backend::Postgres,
        })
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool, for reads.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A connection from the pool, for reads outside a transaction.
    pub async fn connection(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Any>, DbError> {
        Ok(self.pool.acquire().await?)
    }

    /// Starts a write transaction: `BEGIN IMMEDIATE` on SQLite (takes the write lock at once, so
    /// no transaction can fail upgrading a read lock), `BEGIN` on PostgreSQL (rows are locked with
    /// `FOR UPDATE`, see [`Db::for_update`]).
    ///
    /// On SQLite the write transactions of this process take turns on one connection of their
    /// own: SQLite admits one writer at a time anyway, and a writer that finds the lock taken
    /// sleeps in its busy handler (up to 100 ms a time) instead of being woken when the lock is
    /// free, so ten pooled connections contending for it spend most of their time asleep. The
    /// pool's queue hands the connection over at once. Exclusion still comes from SQLite's own
    /// lock: another process on the same file waits for it with `busy_timeout` as before.
    pub async fn begin_write(&self) -> Result<Transaction<'static, sqlx::Any>, DbError> {
        Ok(match (self.backend, &self.writer) {
            (Backend::Sqlite, Some(writer)) => {
                match writer.begin_with("BEGIN IMMEDIATE").await {
                    // sqlx counts the writer still inside a transaction it could not end (its
                    // ROLLBACK failed: SQLite had already rolled it back after an error, or the
                    // task holding it was cancelled mid-statement), and would refuse every
                    // `BEGIN` on it from now on. Close that connection; the pool opens another.
                    Err(sqlx::Error::InvalidSavePointStatement) => {
                        tracing::warn!("SQLite writer left inside a transaction; reconnecting");
                        writer.acquire().await?.close().await?;
                        writer.begin_with("BEGIN IMMEDIATE").await?
                    }
                    begun => begun?,
                }
            }
            (Backend::Sqlite, None) => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            (Backend::Postgres, _) => self.pool.begin().await?,
        })
    }

    /// The row-lock suffix for a `SELECT` inside a write transaction: ` FOR UPDATE` on
    /// PostgreSQL; nothing on SQLite, whose write transaction already excludes other writers.
    pub fn for_update(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// The collation suffix that makes an `ORDER BY` over ids follow [`lock_order`]:
    /// ` COLLATE "C"` (bytes) on PostgreSQL, nothing on SQLite (bytes already).
    pub fn byte_order(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " COLLATE \"C\"",
        }
    }

    /// Copies what it can of SQLite's write-ahead log into the database file without waiting
    /// for readers or the writer (`PRAGMA wal_checkpoint(PASSIVE)`), on a reader connection:
    /// the server runs it in the background every [`CHECKPOINT_EVERY`] (up to
    /// [`CHECKPOINT_IDLE`] while nothing is written), so that the one
    /// writer's commits do not (see `wal_autocheckpoint` in `connect_sqlite`). `None` where
    /// there is no WAL to copy: PostgreSQL, and SQLite in memory.
    pub async fn checkpoint(&self) -> Result<Option<Checkpoint>, DbError> {
        if self.backend != Backend::Sqlite || self.writer.is_none() {
            return Ok(None);
        }
        let row = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&self.pool)
            .await?;
        Ok(Some(Checkpoint {
            busy: row.try_get::<i64, _>(0)? != 0,
            wal_pages: row.try_get(1)?,
            copied_pages: row.try_get(2)?,
        }))
    }

    /// Connections open and idle, for metrics.
    pub fn pool_usage(&self) -> (u32, usize) {
        (self.pool.size(), self.pool.num_idle())
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        if let Some(writer) = &self.writer {
            writer.close().await;
        }
        self.pool.close().await;
    }
}

/// How often the server checkpoints an SQLite database in the background ([`Db::checkpoint`])
/// while the WAL grows. Measured on `spread` and `reserve-capture` (docs/benchmarks.md): every
/// 200 ms, each checkpoint copied enough at once to stall commits (p99 up from 41 to 72 ms);
/// every 20 ms gave the throughput without the stalls.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(20);
/// The longest wait between two background checkpoints, reached by doubling while a database
/// takes no writes.
pub const CHECKPOINT_IDLE: Duration = Duration::from_secs(1);
/// The writer's own checkpoint threshold, in WAL pages (4 KiB each): a safety net for when the
/// background checkpoint falls behind.
const WRITER_AUTOCHECKPOINT: u32 = 10_000;
/// SQLite's default threshold, for every other connection.
const SQLITE_AUTOCHECKPOINT: u32 = 1_000;

/// What one [`Db::checkpoint`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// Another checkpoint was running, so this one did nothing.
    pub busy: bool,
    /// Pages in the write-ahead log.
    pub wal_pages: i64,
    /// Of those, pages now copied into the database file.
    pub copied_pages: i64,
}

/// Prepared statements sqlx keeps per PostgreSQL connection unless the URL sets
/// `statement-cache-capacity`: above sqlx's 100, which group commit's statements outgrow (each
/// `IN` list of [`fetch_in`] and each multi-row write has a statement per size), so that the
/// sizes a service uses stay prepared. A statement over 64 rows of 6 columns holds about 175 KiB
/// of PostgreSQL's memory once planned, so the cache is not made larger than this.
pub const PG_STATEMENT_CACHE: usize = 250;

/// `url` with [`PG_STATEMENT_CACHE`] added unless it sets `statement-cache-capacity` itself.
fn with_statement_cache(url: &str) -> String {
    if url.contains("statement-cache-capacity=") {
        return url.to_string();
    }
    let glue = if url.contains('?') { '&' } else { '?' };
    format!("{url}{glue}statement-cache-capacity={PG_STATEMENT_CACHE}")
}

/// The `application_name` of a service's PostgreSQL connections: `<service>@<schema>`.
pub fn application_name(service: &str, schema: &str) -> String {
    format!("{service}@{schema}")
}

/// The platform's migrations followed by the service's, as one migrator (one migrations table).
/// Versions are timestamps; the platform's come first.
fn combined(platform: &Migrator, own: &Migrator) -> Migrator {
    let mut all: Vec<Migration> = platform.iter().chain(own.iter()).cloned().collect();
    all.sort_by_key(|m| m.version);
    Migrator {
        migrations: all.into(),
        ..Migrator::DEFAULT
    }
}

/// Whether `err` is a unique-constraint violation (both backends).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .is_some_and(|d| d.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

impl Backend {
    /// The backend `conn` talks to.
    pub fn of(conn: &sqlx::AnyConnection) -> Backend {
        if conn.backend_name().eq_ignore_ascii_case("sqlite") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        }
    }
}

/// `n` parameters numbered `from, from+1, ...`, for statements over many rows at once (an
/// `IN (...)` list, or a multi-row `VALUES`): `$from, ...` on PostgreSQL, and on SQLite
/// anonymous `?`s, which SQLite numbers in order of appearance. So the list must stand in the
/// statement's text after every lower-numbered parameter and before every higher-numbered
/// one, as the generated lists here do.
///
/// Why not `$N` on SQLite too: SQLite keeps named parameters in a list it searches linearly,
/// once per parameter when it prepares the statement and again (sqlx asks each parameter's
/// name to find its argument) every time it binds one, so a statement with hundreds of them
/// cost quadratic time on every execution (9% of the wallet's CPU under group commit).
/// Anonymous parameters have no names to look up.
pub fn placeholders(backend: Backend, n: usize, from: usize) -> String {
    match backend {
        Backend::Sqlite => vec!["?"; n].join(", "),
        Backend::Postgres => (from..from + n)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// `ids` in byte order without repeats: the one order in which every transaction that locks
/// several rows takes them, so that two never deadlock (a query that locks them orders by
/// the id with [`Db::byte_order`], and [`fetch_in`]'s chunks of a sorted list follow it).
pub fn lock_order<'a>(ids: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut ids: Vec<&str> = ids.into_iter().collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The pieces in which `items` are written with one multi-row statement each: at most `max`
/// rows a piece (rounded down to a power of two, at least 1), each padded to a power of two.
///
/// Every size of a statement's text is a prepared statement, cached per connection: on SQLite
/// its compiled form over hundreds of rows takes hundreds of kilobytes, and on PostgreSQL sqlx
/// keeps [`PG_STATEMENT_CACHE`] of them, each one evicted costing a round trip and a new plan
/// when it comes back. A statement for every row count (1 to 256 rows of a dozen kinds, under
/// group commit) kept evicting each other. Padded, a kind of statement has a handful of sizes,
/// prepared once, and a batch of any size is still one statement per piece: a batch of 93
/// rows is one statement over 128 rows, the last one repeated 35 times and left out by
/// [`RowChunk::real`].
pub fn row_chunks<T>(
    backend: Backend,
    items: &[T],
    width: usize,
    max: usize,
) -> impl Iterator<Item = RowChunk<'_, T>> {
    let max = pow2_at_most(max);
    items.chunks(max).map(move |rows| RowChunk {
        backend,
        rows,
        size: rows.len().next_power_of_two(),
        width,
    })
}

/// A piece of a multi-row write ([`row_chunks`]): its rows, padded to a power of two, as the
/// table `v` of a statement such as `INSERT INTO t (a, b) {select}` or `UPDATE t SET b =
/// v.column2 FROM {table} WHERE t.a = v.column1 AND {real}`.
/// Bind every one of [`RowChunk::rows`] (`width` values each), then [`RowChunk::count`].
pub struct RowChunk<'a, T> {
    backend: Backend,
    rows: &'a [T],
    size: usize,
    width: usize,
}

impl<'a, T> RowChunk<'a, T> {
    /// `(VALUES (.., 1), (.., 2), ...) AS v`: each row's `width` [`placeholders`], numbered from
    /// 1, in `v.column1` to `v.column{width}`, and its position in `v.column{width + 1}`.
    pub fn table(&self) -> String {
        let rows = (0..self.size)
            .map(|i| {
                let values = placeholders(self.backend, self.width, i * self.width + 1);
                format!("({values}, {})", i + 1)
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!("(VALUES {rows}) AS v")
    }

    /// `SELECT v.column1, ..., v.column{width} FROM {table} WHERE {real}`: the real rows, for
    /// `INSERT INTO t (a, b, ...) {select}`.
    pub fn select(&self) -> String {
        let columns = (1..=self.width)
            .map(|c| format!("v.column{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "SELECT {columns} FROM {} WHERE {}",
            self.table(),
            self.real()
        )
    }

    /// The condition true of the real rows only (the padding's positions are past
    /// [`RowChunk::count`], the parameter after the rows).
    pub fn real(&self) -> String {
        let count = placeholders(self.backend, 1, self.size * self.width + 1);
        format!("v.column{} <= {count}", self.width + 1)
    }

    /// What to bind, in order: the real rows, then the last one repeated up to the padded size.
    pub fn rows(&self) -> impl Iterator<Item = &'a T> + use<'a, T> {
        let last = &self.rows[self.rows.len() - 1];
        self.rows
            .iter()
            .chain(std::iter::repeat_n(last, self.size - self.rows.len()))
    }

    /// The number of real rows: the last parameter.
    pub fn count(&self) -> i64 {
        i64::try_from(self.rows.len()).unwrap_or(i64::MAX)
    }
}

/// The largest power of two not above `n` (`n` at least 1).
fn pow2_at_most(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.max(1).leading_zeros())
}

/// Ids per statement of [`fetch_in`]: far below either backend's limit on bound parameters.
const IN_CHUNK: usize = 512;

/// Runs a query over many ids in chunks and returns every row: `sql(list, next)` builds the
/// statement from its `IN` list ([`placeholders`] numbered from 1) and the number of the first
/// parameter after it; each chunk's ids are bound, then `tail` (e.g. an instant the query
/// compares with). A chunk's list is padded to a power of two by repeating its last id, which
/// changes no `IN`, so that few statement sizes are prepared and cached: on SQLite (see
/// [`row_chunks`]), and on PostgreSQL, where sqlx keeps [`PG_STATEMENT_CACHE`] prepared statements
/// per connection and a statement it evicted costs a round trip and a new plan when it comes back.
pub async fn fetch_in(
    conn: &mut sqlx::AnyConnection,
    ids: &[&str],
    tail: &[i64],
    sql: impl Fn(&str, usize) -> String,
) -> Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
    let backend = Backend::of(conn);
    let mut rows = Vec::new();
    for chunk in ids.chunks(IN_CHUNK) {
        let width = chunk.len().next_power_of_two();
        let text = sql(&placeholders(backend, width, 1), width + 1);
        let mut q = sqlx::query(&text);
        for id in chunk.iter().chain(std::iter::repeat_n(
            &chunk[chunk.len() - 1],
            width - chunk.len(),
        )) {
            q = q.bind(*id);
        }
        for t in tail {
            q = q.bind(*t);
        }
        rows.extend(q.fetch_all(&mut *conn).await?);
    }
    Ok(rows)
}

/// The rows of `select` (a `SELECT ... FROM table` with nothing after it) whose `id_column` is
/// one of `ids`, in [`lock_order`]: ids sorted and deduplicated, chunks ([`fetch_in`]) and each
/// chunk's rows ordered by bytes ([`Db::byte_order`]). With `lock`, the rows are also locked
/// ([`Db::for_update`]), so every write transaction that locks several takes them in that one
/// order and two never deadlock.
pub async fn fetch_in_lock_order<'a>(
    conn: &mut sqlx::AnyConnection,
    db: &Db,
    select: &str,
    id_column: &str,
    ids: impl IntoIterator<Item = &'a str>,
    lock: bool,
) -> Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
    let collate = db.byte_order();
    let locked = if lock { db.for_update() } else { "" };
    fetch_in(conn, &lock_order(ids), &[], |list, _| {
        format!("{select} WHERE {id_column} IN ({list}) ORDER BY {id_column}{collate}{locked}")
    })
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn lost_connections_are_transient_and_bad_data_is_not() {
        for e in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        ] {
            assert!(DbError::Sqlx(e).is_transient());
        }
        assert!(!DbError::Sqlx(sqlx::Error::RowNotFound).is_transient());
        assert!(!DbError::Corrupt("balance".into()).is_transient());
    }

    #[test]
    fn placeholders_are_numbered_on_postgres_and_anonymous_on_sqlite() {
        assert_eq!(placeholders(Backend::Postgres, 3, 2), "$2, $3, $4");
        assert_eq!(placeholders(Backend::Sqlite, 3, 2), "?, ?, ?");
    }

    /// No migrations.
    fn none() -> Migrations {
        Migrations {
            sqlite: Migrator::DEFAULT,
            postgres: Migrator::DEFAULT,
        }
    }

    /// An SQLite database in the file `path`, with two readers and the writer.
    async fn sqlite_file(path: &std::path::Path) -> Db {
        let url = format!("sqlite://{}", path.display());
        Db::connect_url(&url, "", 2, &none()).await.unwrap()
    }

    #[tokio::test]
    async fn a_sqlite_writer_left_inside_a_transaction_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite_file(&dir.path().join("w.db")).await;
        {
            let mut tx = db.begin_write().await.unwrap();
            // SQLite ends the transaction behind sqlx's back (as it does itself after some
            // errors): the ROLLBACK of the drop then fails, and sqlx counts it still open.
            sqlx::query("ROLLBACK").execute(&mut *tx).await.unwrap();
        }
        for _ in 0..3 {
            let mut tx = db.begin_write().await.expect("a write transaction");
            sqlx::query("CREATE TABLE IF NOT EXISTS t (x BIGINT)")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    }

    #[tokio::test]
    async fn the_sqlite_writer_leaves_checkpoints_to_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.db");
        let db = sqlite_file(&file).await;
        let mut tx = db.begin_write().await.unwrap();
        sqlx::query("CREATE TABLE t (x BLOB)")
            .execute(&mut *tx)
            .await
            .unwrap();
        // About a page a row: past SQLite's default threshold of 1,000 pages, below the
        // writer's.
        for _ in 0..1_500 {
            sqlx::query("INSERT INTO t (x) VALUES (zeroblob(3900))")
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        let before = std::fs::metadata(&file).unwrap().len();
        assert!(
            before < 100 * 4096,
            "the writer copied the WAL itself: the database file has {before} bytes"
        );
        let done = db.checkpoint().await.unwrap().expect("a WAL to checkpoint");
        assert!(!done.busy);
        assert!(done.wal_pages >= 1_500, "{done:?}");
        assert_eq!(done.copied_pages, done.wal_pages, "{done:?}");
        let after = std::fs::metadata(&file).unwrap().len();
        assert!(after >= 1_500 * 4096, "the database file has {after} bytes");

        let memory = Db::connect_url("sqlite::memory:", "", 1, &none())
            .await
            .unwrap();
        assert_eq!(memory.checkpoint().await.unwrap(), None, "no WAL in memory");
    }

    #[test]
    fn postgres_urls_get_a_statement_cache_unless_they_set_one() {
        assert_eq!(
            with_statement_cache("postgres://u@h:5432/db"),
            "postgres://u@h:5432/db?statement-cache-capacity=250"
        );
        assert_eq!(
            with_statement_cache("postgres://u@h/db?sslmode=require"),
            "postgres://u@h/db?sslmode=require&statement-cache-capacity=250"
        );
        let own = "postgres://u@h/db?statement-cache-capacity=20";
        assert_eq!(with_statement_cache(own), own);
    }

    #[test]
    fn writes_come_in_pieces_padded_to_powers_of_two() {
        let items: Vec<u32> = (0..93).collect();
        let pieces: Vec<_> = row_chunks(Backend::Postgres, &items, 2, 50).collect();
        let sizes: Vec<(i64, usize)> = pieces
            .iter()
            .map(|p| (p.count(), p.rows().count()))
            .collect();
        assert_eq!(
            sizes,
            vec![(32, 32), (32, 32), (29, 32)],
            "at most 50, rounded down to 32"
        );
        let bound: Vec<u32> = pieces[2].rows().copied().collect();
        assert_eq!(bound[..29], items[64..], "the real rows first");
        assert!(
            bound[29..].iter().all(|&i| i == 92),
            "then the last one again"
        );
        let joined: Vec<u32> = pieces
            .iter()
            .flat_map(|p| p.rows().take(p.count() as usize))
            .copied()
            .collect();
        assert_eq!(joined, items, "every item once, in order");
        assert_eq!(row_chunks(Backend::Sqlite, &items[..0], 2, 8).count(), 0);

        let three: Vec<_> = row_chunks(Backend::Postgres, &items[..3], 2, 8).collect();
        assert_eq!(
            three[0].table(),
            "(VALUES ($1, $2, 1), ($3, $4, 2), ($5, $6, 3), ($7, $8, 4)) AS v"
        );
        assert_eq!(
            three[0].select(),
            format!(
                "SELECT v.column1, v.column2 FROM {} WHERE v.column3 <= $9",
                three[0].table()
            )
        );
        assert_eq!(three[0].real(), "v.column3 <= $9");
        let lite: Vec<_> = row_chunks(Backend::Sqlite, &items[..1], 2, 8).collect();
        assert_eq!(lite[0].table(), "(VALUES (?, ?, 1)) AS v");
        assert_eq!(lite[0].real(), "v.column3 <= ?");
    }
}
