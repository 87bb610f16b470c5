//! The `accounts` table (the review of S16) and the preview-token signing key.

use chrono::{DateTime, Utc};
use runtime::{clock::from_micros, db::DbError};
use sqlx::{AnyConnection, Row};

use crate::model::AccountRecord;

use super::micros;

/// Creates the account row if missing.
pub async fn ensure_account(conn: &mut AnyConnection, account_id: &str) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO accounts (account_id, verified, verified_at_us, verified_by) \
         VALUES ($1, 0, NULL, '') ON CONFLICT (account_id) DO NOTHING",
    )
    .bind(account_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The account (unverified when unknown).
pub async fn account(conn: &mut AnyConnection, account_id: &str) -> Result<AccountRecord, DbError> {
    let row = sqlx::query("SELECT verified, verified_at_us FROM accounts WHERE account_id = $1")
        .bind(account_id)
        .fetch_optional(conn)
        .await?;
    Ok(match row {
        Some(r) => AccountRecord {
            account_id: account_id.to_string(),
            verified: r.try_get::<i64, _>(0)? != 0,
            verified_at: r.try_get::<Option<i64>, _>(1)?.map(from_micros),
        },
        None => AccountRecord {
            account_id: account_id.to_string(),
            verified: false,
            verified_at: None,
        },
    })
}

/// Marks an account verified (S16).
pub async fn verify_account(
    conn: &mut AnyConnection,
    account_id: &str,
    by: &str,
    at: DateTime<Utc>,
) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE accounts SET verified = 1, verified_at_us = $2, verified_by = $3 \
         WHERE account_id = $1 AND verified = 0",
    )
    .bind(account_id)
    .bind(micros(at))
    .bind(by)
    .execute(conn)
    .await?;
    Ok(())
}

/// The key preview tokens are signed with (the migration generated it).
pub async fn preview_token_key(conn: &mut AnyConnection) -> Result<String, DbError> {
    let row = sqlx::query("SELECT secret FROM preview_token_key WHERE id = 1")
        .fetch_one(conn)
        .await?;
    Ok(row.try_get(0)?)
}
