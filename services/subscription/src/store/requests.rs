//! The `change_requests` table (S10).

use runtime::{
    clock::from_micros,
    db::{Db, DbError},
};
use sqlx::{AnyConnection, Row, any::AnyRow};

use crate::model::{ChangeRequestRecord, RequestStatus};

use super::{corrupt, from_json, json, micros};

const REQUEST_COLUMNS: &str = "request_id, subscription_id, account_id, change, status, filed_by, \
     filed_at_us, resolved_by, resolved_at_us, note";

fn request_from_row(r: &AnyRow) -> Result<ChangeRequestRecord, DbError> {
    let change: String = r.try_get("change")?;
    let status: String = r.try_get("status")?;
    Ok(ChangeRequestRecord {
        request_id: r.try_get("request_id")?,
        subscription_id: r.try_get("subscription_id")?,
        account_id: r.try_get("account_id")?,
        change: from_json("change", &change)?,
        status: RequestStatus::parse(&status).ok_or_else(|| corrupt("request status"))?,
        filed_by: r.try_get("filed_by")?,
        filed_at: from_micros(r.try_get("filed_at_us")?),
        resolved_by: r.try_get("resolved_by")?,
        resolved_at: r
            .try_get::<Option<i64>, _>("resolved_at_us")?
            .map(from_micros),
        note: r.try_get("note")?,
    })
}

/// Files a change request.
pub async fn insert_request(
    conn: &mut AnyConnection,
    c: &ChangeRequestRecord,
) -> Result<(), DbError> {
    sqlx::query(&format!(
        "INSERT INTO change_requests ({REQUEST_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    ))
    .bind(&c.request_id)
    .bind(&c.subscription_id)
    .bind(&c.account_id)
    .bind(json(&c.change)?)
    .bind(c.status.as_str())
    .bind(&c.filed_by)
    .bind(micros(c.filed_at))
    .bind(&c.resolved_by)
    .bind(c.resolved_at.map(micros))
    .bind(&c.note)
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes a request's resolution.
pub async fn update_request(
    conn: &mut AnyConnection,
    c: &ChangeRequestRecord,
) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE change_requests SET status = $2, resolved_by = $3, resolved_at_us = $4, note = $5 \
         WHERE request_id = $1",
    )
    .bind(&c.request_id)
    .bind(c.status.as_str())
    .bind(&c.resolved_by)
    .bind(c.resolved_at.map(micros))
    .bind(&c.note)
    .execute(conn)
    .await?;
    Ok(())
}

/// One request.
pub async fn request(
    conn: &mut AnyConnection,
    request_id: &str,
) -> Result<Option<ChangeRequestRecord>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {REQUEST_COLUMNS} FROM change_requests WHERE request_id = $1"
    ))
    .bind(request_id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(request_from_row).transpose()
}

/// Requests of one account (or all), oldest first.
pub async fn requests(
    db: &Db,
    account_id: &str,
    open_only: bool,
) -> Result<Vec<ChangeRequestRecord>, DbError> {
    let rows = sqlx::query(&format!(
        "SELECT {REQUEST_COLUMNS} FROM change_requests WHERE ($1 = '' OR account_id = $1) \
         AND ($2 = 0 OR status = 'open') ORDER BY filed_at_us, request_id"
    ))
    .bind(account_id)
    .bind(i64::from(open_only))
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(request_from_row).collect()
}
