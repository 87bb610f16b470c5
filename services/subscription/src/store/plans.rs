//! The `plans` table: published plan versions (never changed once published).

use chrono::{DateTime, Utc};
use runtime::{
    clock::from_micros,
    db::{Db, DbError},
};
use sqlx::{AnyConnection, Row, any::AnyRow};

use crate::domain::{Plan, Product};

use super::{from_json, json, micros, u32_of};

/// The next version of `plan_id` (1 for a new plan), inside the publishing transaction.
pub async fn next_plan_version(conn: &mut AnyConnection, plan_id: &str) -> Result<u32, DbError> {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(MAX(version), 0) AS BIGINT) FROM plans WHERE plan_id = $1",
    )
    .bind(plan_id)
    .fetch_one(conn)
    .await?;
    u32_of(row.try_get::<i64, _>(0)? + 1, "plan version")
}

/// Stores a plan version; `false` if that version exists (a concurrent publisher won).
pub async fn insert_plan(
    conn: &mut AnyConnection,
    plan: &Plan,
    published_at: DateTime<Utc>,
) -> Result<bool, DbError> {
    let done = sqlx::query(
        "INSERT INTO plans (plan_id, version, product, level_rank, document, published_at_us) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (plan_id, version) DO NOTHING",
    )
    .bind(&plan.plan_id)
    .bind(i64::from(plan.version))
    .bind(plan.product.as_str())
    .bind(i64::from(plan.level.rank))
    .bind(json(plan)?)
    .bind(micros(published_at))
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

fn plan_from_row(r: &AnyRow) -> Result<(Plan, DateTime<Utc>), DbError> {
    let doc: String = r.try_get("document")?;
    Ok((
        from_json("plan", &doc)?,
        from_micros(r.try_get("published_at_us")?),
    ))
}

/// One plan version, or the latest when `version` is `None`.
pub async fn plan(
    conn: &mut AnyConnection,
    plan_id: &str,
    version: Option<u32>,
) -> Result<Option<(Plan, DateTime<Utc>)>, DbError> {
    let row =
        match version {
            Some(v) => sqlx::query(
                "SELECT document, published_at_us FROM plans WHERE plan_id = $1 AND version = $2",
            )
            .bind(plan_id)
            .bind(i64::from(v))
            .fetch_optional(conn)
            .await?,
            None => {
                sqlx::query(
                    "SELECT document, published_at_us FROM plans WHERE plan_id = $1 \
                 ORDER BY version DESC LIMIT 1",
                )
                .bind(plan_id)
                .fetch_optional(conn)
                .await?
            }
        };
    row.as_ref().map(plan_from_row).transpose()
}

/// Plans, latest versions only unless `all_versions`, optionally of one product.
pub async fn list_plans(
    db: &Db,
    product: Option<Product>,
    all_versions: bool,
) -> Result<Vec<(Plan, DateTime<Utc>)>, DbError> {
    let rows = sqlx::query(
        "SELECT p.document, p.published_at_us FROM plans p \
         WHERE ($1 = '' OR p.product = $1) \
         AND ($2 = 1 OR p.version = (SELECT MAX(q.version) FROM plans q WHERE q.plan_id = p.plan_id)) \
         ORDER BY p.plan_id, p.version",
    )
    .bind(product.map_or("", Product::as_str))
    .bind(i64::from(all_versions))
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(plan_from_row).collect()
}
