//! The reseller's schema and queries, written once for SQLite and PostgreSQL (sqlx `Any`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use runtime::{
    clock::from_micros,
    db::{Backend, Db, DbError, fetch_in, fetch_in_lock_order, row_chunks},
};
use sqlx::{AnyConnection, Row, any::AnyRow};

use crate::{
    domain::{self, BillingMode, Funding, Payer, Usage},
    model::{CustomerRecord, HoldStatus, PartnerRecord, RoutedRecord, SendKind, SendStatus},
};

fn corrupt(what: &str) -> DbError {
    DbError::Corrupt(what.to_string())
}

const PARTNER_COLUMNS: &str = "partner_id, currency, funding, payment_method, wallet_id, pricing, rating, resale_prices, created_at_us";

fn partner_from_row(r: &AnyRow) -> Result<PartnerRecord, DbError> {
    let funding: String = r.try_get("funding")?;
    let currency: String = r.try_get("currency")?;
    Ok(PartnerRecord {
        partner_id: r.try_get("partner_id")?,
        currency: currency.parse().map_err(|_| corrupt("currency"))?,
        funding: Funding::parse(&funding).ok_or_else(|| corrupt("funding"))?,
        payment_method: r.try_get("payment_method")?,
        wallet_id: r.try_get("wallet_id")?,
        pricing: r.try_get("pricing")?,
        rating: r.try_get("rating")?,
        resale_prices: r.try_get("resale_prices")?,
        created_at: from_micros(r.try_get("created_at_us")?),
    })
}

/// Inserts a partner; `false` when the id is taken.
pub async fn insert_partner(conn: &mut AnyConnection, p: &PartnerRecord) -> Result<bool, DbError> {
    let done = sqlx::query(&format!(
        "INSERT INTO partners ({PARTNER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (partner_id) DO NOTHING"
    ))
    .bind(&p.partner_id)
    .bind(p.currency.code())
    .bind(p.funding.as_str())
    .bind(&p.payment_method)
    .bind(&p.wallet_id)
    .bind(&p.pricing)
    .bind(&p.rating)
    .bind(&p.resale_prices)
    .bind(p.created_at.timestamp_micros())
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// One partner.
pub async fn partner(
    conn: &mut AnyConnection,
    partner_id: &str,
) -> Result<Option<PartnerRecord>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {PARTNER_COLUMNS} FROM partners WHERE partner_id = $1"
    ))
    .bind(partner_id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(partner_from_row).transpose()
}

/// Sets a partner's resale prices.
pub async fn set_resale_prices(
    conn: &mut AnyConnection,
    partner_id: &str,
    json: &str,
) -> Result<(), DbError> {
    sqlx::query("UPDATE partners SET resale_prices = $2 WHERE partner_id = $1")
        .bind(partner_id)
        .bind(json)
        .execute(conn)
        .await?;
    Ok(())
}

const CUSTOMER_COLUMNS: &str =
    "customer_id, partner_id, billing_mode, suspended, monthly_limit, wallet_id";

fn customer_from_row(r: &AnyRow) -> Result<CustomerRecord, DbError> {
    let mode: String = r.try_get("billing_mode")?;
    Ok(CustomerRecord {
        customer_id: r.try_get("customer_id")?,
        partner_id: r.try_get("partner_id")?,
        billing_mode: BillingMode::parse(&mode).ok_or_else(|| corrupt("billing_mode"))?,
        suspended: r.try_get::<i64, _>("suspended")? != 0,
        monthly_limit: r.try_get("monthly_limit")?,
        wallet_id: r.try_get("wallet_id")?,
    })
}

/// Inserts a customer; `false` when its partner has it already.
pub async fn insert_customer(
    conn: &mut AnyConnection,
    c: &CustomerRecord,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    let done = sqlx::query(&format!(
        "INSERT INTO customers ({CUSTOMER_COLUMNS}, created_at_us, customer_key) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (customer_key) DO NOTHING"
    ))
    .bind(&c.customer_id)
    .bind(&c.partner_id)
    .bind(c.billing_mode.as_str())
    .bind(i64::from(c.suspended))
    .bind(c.monthly_limit)
    .bind(&c.wallet_id)
    .bind(now.timestamp_micros())
    .bind(domain::customer_key(&c.partner_id, &c.customer_id))
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A partner's customer, row-locked on PostgreSQL inside a write transaction.
pub async fn lock_customer(
    conn: &mut AnyConnection,
    db: &Db,
    partner_id: &str,
    customer_id: &str,
) -> Result<Option<CustomerRecord>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE customer_key = $1{}",
        db.for_update()
    ))
    .bind(domain::customer_key(partner_id, customer_id))
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(customer_from_row).transpose()
}

/// Writes a customer's mutable columns.
pub async fn update_customer(conn: &mut AnyConnection, c: &CustomerRecord) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE customers SET billing_mode = $2, suspended = $3, monthly_limit = $4, wallet_id = $5 \
         WHERE customer_key = $1",
    )
    .bind(domain::customer_key(&c.partner_id, &c.customer_id))
    .bind(c.billing_mode.as_str())
    .bind(i64::from(c.suspended))
    .bind(c.monthly_limit)
    .bind(&c.wallet_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// A partner's customers after `after` (by id), at most `limit`.
pub async fn customers(
    db: &Db,
    partner_id: &str,
    after: &str,
    limit: i64,
) -> Result<Vec<CustomerRecord>, DbError> {
    let rows = sqlx::query(&format!(
        "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE partner_id = $1 AND customer_id > $2 \
         ORDER BY customer_id LIMIT $3"
    ))
    .bind(partner_id)
    .bind(after)
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(customer_from_row).collect()
}

/// Partner credits a partner's customer used (or has routed, pending or held) since `since`:
/// what counts against its monthly cap.
pub async fn partner_credits_used_since(
    conn: &mut AnyConnection,
    partner_id: &str,
    customer_id: &str,
    since: DateTime<Utc>,
) -> Result<i64, DbError> {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(credits), 0) AS BIGINT) FROM routed WHERE customer_id = $1 \
         AND partner_id = $3 AND payer = 'partner' AND status <> 'failed' AND created_at_us >= $2 \
         AND (reservation_status IS NULL OR reservation_status IN ('active', 'captured'))",
    )
    .bind(customer_id)
    .bind(since.timestamp_micros())
    .bind(partner_id)
    .fetch_one(conn)
    .await?;
    Ok(row.try_get(0)?)
}

const ROUTED_COLUMNS: &str = "idempotency_key, kind, partner_id, customer_id, payer, payer_wallet_id, \
     mailing_id, recipients, credits, status, reservation_id, reservation_status";

fn routed_from_row(r: &AnyRow) -> Result<RoutedRecord, DbError> {
    let payer: String = r.try_get("payer")?;
    let kind: String = r.try_get("kind")?;
    let status: String = r.try_get("status")?;
    let hold: Option<String> = r.try_get("reservation_status")?;
    Ok(RoutedRecord {
        idempotency_key: r.try_get("idempotency_key")?,
        kind: SendKind::parse(&kind).ok_or_else(|| corrupt("kind"))?,
        partner_id: r.try_get("partner_id")?,
        customer_id: r.try_get("customer_id")?,
        payer: Payer::parse(&payer).ok_or_else(|| corrupt("payer"))?,
        payer_wallet_id: r.try_get("payer_wallet_id")?,
        mailing_id: r.try_get("mailing_id")?,
        recipients: r.try_get("recipients")?,
        credits: r.try_get("credits")?,
        status: SendStatus::parse(&status).ok_or_else(|| corrupt("status"))?,
        reservation_id: r.try_get("reservation_id")?,
        reservation_status: hold
            .map(|h| HoldStatus::parse(&h).ok_or_else(|| corrupt("reservation_status")))
            .transpose()?,
        former_wallet_key: r.try_get("former_wallet_key")?,
    })
}

/// Records a routing decision (status `pending`).
pub async fn insert_routed(
    conn: &mut AnyConnection,
    r: &RoutedRecord,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    insert_routed_many(conn, std::slice::from_ref(r), now).await
}

/// The routing recorded under an idempotency key.
pub async fn routed(conn: &mut AnyConnection, key: &str) -> Result<Option<RoutedRecord>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {ROUTED_COLUMNS}, former_wallet_key FROM routed WHERE idempotency_key = $1"
    ))
    .bind(key)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(routed_from_row).transpose()
}

/// The routed hold with the wallet's reservation id.
pub async fn routed_by_reservation(
    conn: &mut AnyConnection,
    reservation_id: &str,
) -> Result<Option<RoutedRecord>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {ROUTED_COLUMNS}, former_wallet_key FROM routed WHERE reservation_id = $1"
    ))
    .bind(reservation_id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(routed_from_row).transpose()
}

/// Updates a routing's outcome.
pub async fn update_routed(conn: &mut AnyConnection, r: &RoutedRecord) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE routed SET status = $2, credits = $3, reservation_id = $4, reservation_status = $5 \
         WHERE idempotency_key = $1",
    )
    .bind(&r.idempotency_key)
    .bind(r.status.as_str())
    .bind(r.credits)
    .bind(&r.reservation_id)
    .bind(r.reservation_status.map(HoldStatus::as_str))
    .execute(conn)
    .await?;
    Ok(())
}

/// Per customer of a partner, what was sent and paid in `[from, to)`: charges that went
/// through and captured holds.
pub async fn usage(
    db: &Db,
    partner_id: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<(String, Usage)>, DbError> {
    let rows = sqlx::query(
        "SELECT customer_id, payer, CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(recipients), 0) AS BIGINT), \
         CAST(COALESCE(SUM(credits), 0) AS BIGINT) FROM routed \
         WHERE partner_id = $1 AND created_at_us >= $2 AND created_at_us < $3 AND status = 'done' \
         AND (kind = 'charge' OR reservation_status = 'captured') \
         GROUP BY customer_id, payer ORDER BY customer_id",
    )
    .bind(partner_id)
    .bind(from.timestamp_micros())
    .bind(to.timestamp_micros())
    .fetch_all(db.pool())
    .await?;
    let mut out: Vec<(String, Usage)> = Vec::new();
    for r in &rows {
        let customer: String = r.try_get(0)?;
        let payer: String = r.try_get(1)?;
        let (mailings, recipients, credits): (i64, i64, i64) =
            (r.try_get(2)?, r.try_get(3)?, r.try_get(4)?);
        if out.last().is_none_or(|(c, _)| *c != customer) {
            out.push((customer.clone(), Usage::default()));
        }
        if let Some((_, u)) = out.last_mut() {
            u.mailings += mailings;
            u.recipients += recipients;
            match Payer::parse(&payer) {
                Some(Payer::Partner) => u.partner_paid += credits,
                Some(Payer::Customer) => u.customer_paid += credits,
                None => return Err(corrupt("payer")),
            }
        }
    }
    Ok(out)
}

/// Where the wallet-event relay stands.
pub async fn relay_cursor(db: &Db) -> Result<i64, DbError> {
    Ok(
        sqlx::query("SELECT wallet_cursor FROM wallet_relay WHERE id = 1")
            .fetch_one(db.pool())
            .await?
            .try_get(0)?,
    )
}

/// Moves the relay's cursor (in the transaction that appends the relayed event).
pub async fn set_relay_cursor(conn: &mut AnyConnection, cursor: i64) -> Result<(), DbError> {
    sqlx::query("UPDATE wallet_relay SET wallet_cursor = $1 WHERE id = 1 AND wallet_cursor < $1")
        .bind(cursor)
        .execute(conn)
        .await?;
    Ok(())
}

// Group commit (`crate::service::group_commit`): the reads and writes of routed sends above, for many sends in
// one statement per chunk (far below either backend's limit on bound parameters).

/// Rows per statement (half a full batch, at most 1,664 bound parameters): one prepared
/// statement for each power of two up to it ([`row_chunks`]).
const ROWS: usize = 128;

/// [`routed`] for many keys.
pub async fn routed_many(
    conn: &mut AnyConnection,
    keys: &[&str],
) -> Result<HashMap<String, RoutedRecord>, DbError> {
    fetch_in(conn, keys, &[], |list, _| {
        format!("SELECT {ROUTED_COLUMNS}, former_wallet_key FROM routed WHERE idempotency_key IN ({list})")
    })
    .await?
    .iter()
    .map(|r| routed_from_row(r).map(|x| (x.idempotency_key.clone(), x)))
    .collect()
}

/// [`lock_customer`] for many customers by their keys ([`domain::customer_key`]), locked in
/// byte order of their keys (the one order of every transaction that locks several, so two
/// never deadlock); the map is by key.
pub async fn lock_customers(
    conn: &mut AnyConnection,
    db: &Db,
    customer_keys: &[&str],
) -> Result<HashMap<String, CustomerRecord>, DbError> {
    fetch_in_lock_order(
        conn,
        db,
        &format!("SELECT {CUSTOMER_COLUMNS} FROM customers"),
        "customer_key",
        customer_keys.iter().copied(),
        true,
    )
    .await?
    .iter()
    .map(|r| customer_from_row(r).map(|c| (domain::customer_key(&c.partner_id, &c.customer_id), c)))
    .collect()
}

/// [`partner`] for many partners.
pub async fn partners_many(
    conn: &mut AnyConnection,
    partner_ids: &[&str],
) -> Result<HashMap<String, PartnerRecord>, DbError> {
    fetch_in(conn, partner_ids, &[], |list, _| {
        format!("SELECT {PARTNER_COLUMNS} FROM partners WHERE partner_id IN ({list})")
    })
    .await?
    .iter()
    .map(|r| partner_from_row(r).map(|p| (p.partner_id.clone(), p)))
    .collect()
}

/// [`partner_credits_used_since`] for many customers, given as `(partner_id, customer_id)`;
/// the map is by [`domain::customer_key`] (absent: none used).
pub async fn partner_credits_used_since_many(
    conn: &mut AnyConnection,
    customers: &[(&str, &str)],
    since: DateTime<Utc>,
) -> Result<HashMap<String, i64>, DbError> {
    // By customer id (the index's first column), each id once; another partner's customer of
    // the same id is read too and left out.
    let mut ids: Vec<&str> = customers.iter().map(|&(_, c)| c).collect();
    ids.sort_unstable();
    ids.dedup();
    let rows = fetch_in(conn, &ids, &[since.timestamp_micros()], |list, next| {
        format!(
            "SELECT partner_id, customer_id, CAST(COALESCE(SUM(credits), 0) AS BIGINT) \
             FROM routed WHERE customer_id IN ({list}) AND payer = 'partner' \
             AND status <> 'failed' AND created_at_us >= ${next} \
             AND (reservation_status IS NULL OR reservation_status IN ('active', 'captured')) \
             GROUP BY partner_id, customer_id"
        )
    })
    .await?;
    let wanted: std::collections::HashSet<String> = customers
        .iter()
        .map(|&(p, c)| domain::customer_key(p, c))
        .collect();
    let mut used = HashMap::new();
    for row in &rows {
        let (partner, customer): (String, String) = (row.try_get(0)?, row.try_get(1)?);
        let key = domain::customer_key(&partner, &customer);
        if wanted.contains(&key) {
            used.insert(key, row.try_get(2)?);
        }
    }
    Ok(used)
}

/// [`insert_routed`] for many routings.
pub async fn insert_routed_many(
    conn: &mut AnyConnection,
    routed: &[RoutedRecord],
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    for chunk in row_chunks(Backend::of(conn), routed, 13, ROWS) {
        let sql = format!(
            "INSERT INTO routed ({ROUTED_COLUMNS}, created_at_us) {}",
            chunk.select()
        );
        let mut q = sqlx::query(&sql);
        for r in chunk.rows() {
            q = q
                .bind(&r.idempotency_key)
                .bind(r.kind.as_str())
                .bind(&r.partner_id)
                .bind(&r.customer_id)
                .bind(r.payer.as_str())
                .bind(&r.payer_wallet_id)
                .bind(&r.mailing_id)
                .bind(r.recipients)
                .bind(r.credits)
                .bind(r.status.as_str())
                .bind(&r.reservation_id)
                .bind(r.reservation_status.map(HoldStatus::as_str))
                .bind(now.timestamp_micros());
        }
        q.bind(chunk.count()).execute(&mut *conn).await?;
    }
    Ok(())
}

/// [`update_routed`] for many routings, one `UPDATE ... FROM (VALUES ...)` per chunk.
pub async fn update_routed_many(
    conn: &mut AnyConnection,
    routed: &[&RoutedRecord],
) -> Result<(), DbError> {
    for chunk in row_chunks(Backend::of(conn), routed, 5, ROWS) {
        let sql = format!(
            "UPDATE routed SET status = v.column2, credits = v.column3, reservation_id = v.column4, \
             reservation_status = v.column5 FROM {} \
             WHERE routed.idempotency_key = v.column1 AND {}",
            chunk.table(),
            chunk.real()
        );
        let mut q = sqlx::query(&sql);
        for r in chunk.rows() {
            q = q
                .bind(&r.idempotency_key)
                .bind(r.status.as_str())
                .bind(r.credits)
                .bind(&r.reservation_id)
                .bind(r.reservation_status.map(HoldStatus::as_str));
        }
        q.bind(chunk.count()).execute(&mut *conn).await?;
    }
    Ok(())
}
