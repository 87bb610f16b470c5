//! The service's schema and queries, written once for SQLite and PostgreSQL (sqlx `Any`; see
//! `runtime::db`). Functions taking `&mut AnyConnection` run inside the caller's transaction;
//! `lock_*` take row locks on PostgreSQL (SQLite's write transaction already excludes other
//! writers).

use chrono::{DateTime, Utc};
use runtime::db::{Backend, Db, DbError};
use shared::Money;

mod accounts;
mod invoices;
mod plans;
mod requests;
mod subscriptions;

pub use accounts::*;
pub use invoices::*;
pub use plans::*;
pub use requests::*;
pub use subscriptions::*;

fn corrupt(what: impl Into<String>) -> DbError {
    DbError::Corrupt(what.into())
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, DbError> {
    serde_json::to_string(v).map_err(|e| corrupt(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T, DbError> {
    serde_json::from_str(s).map_err(|e| corrupt(format!("{what}: {e}")))
}

fn minor(m: &Money) -> Result<i64, DbError> {
    m.to_minor_units()
        .map_err(|e| corrupt(format!("amount {m}: {e}")))
}

fn u32_of(v: i64, what: &str) -> Result<u32, DbError> {
    u32::try_from(v).map_err(|_| corrupt(what.to_string()))
}

fn u64_of(v: i64, what: &str) -> Result<u64, DbError> {
    u64::try_from(v).map_err(|_| corrupt(what.to_string()))
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The lock suffix that lets concurrent claimers take different rows: on PostgreSQL a row
/// another replica's batch holds is skipped (it renews that one); SQLite's write transaction
/// already admits one claimer at a time, and whatever it renewed is no longer due for the next.
fn skip_locked(db: &Db) -> &'static str {
    match db.backend() {
        Backend::Sqlite => "",
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
    }
}

/// Rows per multi-row statement: well under SQLite's 32,766 and PostgreSQL's 65,535 bound
/// parameters at 36 columns; one prepared statement for each power of two up to it
/// ([`row_chunks`]).
const ROWS_PER_STATEMENT: usize = 64;

/// `b = v.column2, c = v.column3, ...`: every column but the first (the row's key) set from
/// its place in a [`row_chunks`] table.
fn value_columns(columns: &[&str]) -> String {
    columns
        .iter()
        .enumerate()
        .skip(1)
        .map(|(i, c)| format!("{c} = v.column{}", i + 1))
        .collect::<Vec<_>>()
        .join(", ")
}
