//! The wallet's schema and queries, written once for SQLite and PostgreSQL (sqlx `Any`; see
//! `runtime::db`). Functions taking `&mut AnyConnection` run inside the caller's write
//! transaction; [`lock_wallet`] takes the wallet's row lock on PostgreSQL (SQLite's write
//! transaction already excludes other writers).

use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};

use runtime::{
    clock::from_micros,
    db::{Backend, Db, DbError, fetch_in, fetch_in_lock_order, row_chunks},
};
use shared::{Currency, Money, RatingRule};
use sqlx::{AnyConnection, Row, any::AnyRow};

use crate::{
    domain::{AutoTopUp, AutoTopUpMode, Lot, LotKind, Reminder},
    model::{
        EntryKind, EntryRecord, FundingMode, PurchaseRecord, PurchaseStatus, PurchaseTrigger,
        ReservationRecord, ReservationStatus, WalletRecord,
    },
};

fn corrupt(what: impl Into<String>) -> DbError {
    DbError::Corrupt(what.into())
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn opt_micros(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(micros)
}

const WALLET_COLUMNS: &str = "wallet_id, currency, balance, held, debt, ledger_seq, funding_mode, \
     payment_method, credits_per_recipient, per_mailing_surcharge, pricing, top_up_mode, \
     top_up_threshold, top_up_amount, top_up_max_per_purchase, top_up_monthly_cap, \
     reminder_threshold, reminder_armed, created_at_us";

fn wallet_from_row(r: &AnyRow) -> Result<WalletRecord, DbError> {
    let currency: String = r.try_get("currency")?;
    let funding: String = r.try_get("funding_mode")?;
    let cpr: String = r.try_get("credits_per_recipient")?;
    let surcharge: i64 = r.try_get("per_mailing_surcharge")?;
    let pricing: String = r.try_get("pricing")?;
    let mode: String = r.try_get("top_up_mode")?;
    let threshold: i64 = r.try_get("top_up_threshold")?;
    let amount: i64 = r.try_get("top_up_amount")?;
    let max: i64 = r.try_get("top_up_max_per_purchase")?;
    let cap: i64 = r.try_get("top_up_monthly_cap")?;
    let reminder_threshold: i64 = r.try_get("reminder_threshold")?;
    let armed: i64 = r.try_get("reminder_armed")?;
    let rating = RatingRule::new(
        cpr.parse().map_err(|_| corrupt("credits_per_recipient"))?,
        shared::Credits::new(surcharge).map_err(|_| corrupt("per_mailing_surcharge"))?,
    )
    .map_err(|e| corrupt(format!("rating rule: {e}")))?;
    let mode = match mode.as_str() {
        "off" => AutoTopUpMode::Off,
        "fixed" => AutoTopUpMode::Fixed { threshold, amount },
        "shortfall" => AutoTopUpMode::Shortfall {
            max_per_purchase: max,
        },
        other => return Err(corrupt(format!("top_up_mode {other}"))),
    };
    Ok(WalletRecord {
        wallet_id: r.try_get("wallet_id")?,
        currency: currency.parse().map_err(|_| corrupt("currency"))?,
        balance: r.try_get("balance")?,
        held: r.try_get("held")?,
        debt: r.try_get("debt")?,
        ledger_seq: r.try_get("ledger_seq")?,
        funding: FundingMode::parse(&funding).ok_or_else(|| corrupt("funding_mode"))?,
        payment_method: r.try_get("payment_method")?,
        rating,
        pricing: serde_json::from_str(&pricing).map_err(|e| corrupt(format!("pricing: {e}")))?,
        top_up: AutoTopUp {
            mode,
            monthly_cap: (cap > 0).then_some(cap),
        },
        reminder: Reminder {
            threshold: (reminder_threshold > 0).then_some(reminder_threshold),
            armed: armed != 0,
        },
        created_at: from_micros(r.try_get("created_at_us")?),
    })
}

fn top_up_columns(t: &AutoTopUp) -> (&'static str, i64, i64, i64, i64) {
    let cap = t.monthly_cap.unwrap_or(0);
    match t.mode {
        AutoTopUpMode::Off => ("off", 0, 0, 0, cap),
        AutoTopUpMode::Fixed { threshold, amount } => ("fixed", threshold, amount, 0, cap),
        AutoTopUpMode::Shortfall { max_per_purchase } => ("shortfall", 0, 0, max_per_purchase, cap),
    }
}

/// Inserts a new wallet; `false` when the id is taken.
pub async fn insert_wallet(conn: &mut AnyConnection, w: &WalletRecord) -> Result<bool, DbError> {
    let pricing = serde_json::to_string(&w.pricing).map_err(|e| corrupt(e.to_string()))?;
    let (mode, threshold, amount, max, cap) = top_up_columns(&w.top_up);
    let done = sqlx::query(&format!(
        "INSERT INTO wallets ({WALLET_COLUMNS}) VALUES \
         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19) \
         ON CONFLICT (wallet_id) DO NOTHING"
    ))
    .bind(&w.wallet_id)
    .bind(w.currency.code())
    .bind(w.balance)
    .bind(w.held)
    .bind(w.debt)
    .bind(w.ledger_seq)
    .bind(w.funding.as_str())
    .bind(&w.payment_method)
    .bind(w.rating.credits_per_recipient().to_string())
    .bind(w.rating.per_mailing_surcharge().get())
    .bind(pricing)
    .bind(mode)
    .bind(threshold)
    .bind(amount)
    .bind(max)
    .bind(cap)
    .bind(w.reminder.threshold.unwrap_or(0))
    .bind(i64::from(w.reminder.armed))
    .bind(micros(w.created_at))
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Reads and (on PostgreSQL) row-locks a wallet for the rest of the transaction.
pub async fn lock_wallet(
    conn: &mut AnyConnection,
    db: &Db,
    wallet_id: &str,
) -> Result<Option<WalletRecord>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {WALLET_COLUMNS} FROM wallets WHERE wallet_id = $1{}",
        db.for_update()
    ))
    .bind(wallet_id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(wallet_from_row).transpose()
}

/// Reads a wallet without locking.
pub async fn read_wallet(
    conn: &mut AnyConnection,
    wallet_id: &str,
) -> Result<Option<WalletRecord>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {WALLET_COLUMNS} FROM wallets WHERE wallet_id = $1"
    ))
    .bind(wallet_id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(wallet_from_row).transpose()
}

/// Writes back every mutable column of a wallet header.
pub async fn update_wallet(conn: &mut AnyConnection, w: &WalletRecord) -> Result<(), DbError> {
    let (mode, threshold, amount, max, cap) = top_up_columns(&w.top_up);
    sqlx::query(
        "UPDATE wallets SET balance = $2, held = $3, debt = $4, ledger_seq = $5, funding_mode = $6, \
         payment_method = $7, top_up_mode = $8, top_up_threshold = $9, top_up_amount = $10, \
         top_up_max_per_purchase = $11, top_up_monthly_cap = $12, reminder_threshold = $13, \
         reminder_armed = $14 WHERE wallet_id = $1",
    )
    .bind(&w.wallet_id)
    .bind(w.balance)
    .bind(w.held)
    .bind(w.debt)
    .bind(w.ledger_seq)
    .bind(w.funding.as_str())
    .bind(&w.payment_method)
    .bind(mode)
    .bind(threshold)
    .bind(amount)
    .bind(max)
    .bind(cap)
    .bind(w.reminder.threshold.unwrap_or(0))
    .bind(i64::from(w.reminder.armed))
    .execute(conn)
    .await?;
    Ok(())
}

/// Lots with credits left (live or expired but not yet swept).
pub async fn lots_with_credits(
    conn: &mut AnyConnection,
    wallet_id: &str,
) -> Result<Vec<(Lot, i64)>, DbError> {
    let rows = sqlx::query(
        "SELECT lot_id, kind, remaining, expires_at_us, created_at_us, granted FROM credit_lots \
         WHERE wallet_id = $1 AND remaining > 0",
    )
    .bind(wallet_id)
    .fetch_all(conn)
    .await?;
    rows.iter().map(|r| lot_from_row(r, 0)).collect()
}

/// `lot_id, kind, remaining, expires_at_us, created_at_us, granted` from column `first` on.
fn lot_from_row(r: &AnyRow, first: usize) -> Result<(Lot, i64), DbError> {
    let kind: String = r.try_get(first + 1)?;
    let expires: Option<i64> = r.try_get(first + 3)?;
    Ok((
        Lot {
            lot_id: r.try_get(first)?,
            kind: LotKind::parse(&kind).ok_or_else(|| corrupt("lot kind"))?,
            remaining: r.try_get(first + 2)?,
            expires_at: expires.map(from_micros),
            created_at: from_micros(r.try_get(first + 4)?),
        },
        r.try_get(first + 5)?,
    ))
}

/// A new lot.
pub async fn insert_lot(
    conn: &mut AnyConnection,
    wallet_id: &str,
    lot: &Lot,
    granted: i64,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO credit_lots (lot_id, wallet_id, kind, granted, remaining, expires_at_us, created_at_us) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&lot.lot_id)
    .bind(wallet_id)
    .bind(lot.kind.as_str())
    .bind(granted)
    .bind(lot.remaining)
    .bind(opt_micros(lot.expires_at))
    .bind(micros(lot.created_at))
    .execute(conn)
    .await?;
    Ok(())
}

/// Sets a lot's remaining credits.
pub async fn set_lot_remaining(
    conn: &mut AnyConnection,
    lot_id: &str,
    remaining: i64,
) -> Result<(), DbError> {
    sqlx::query("UPDATE credit_lots SET remaining = $2 WHERE lot_id = $1")
        .bind(lot_id)
        .bind(remaining)
        .execute(conn)
        .await?;
    Ok(())
}

/// Appends a ledger entry.
pub async fn insert_entry(
    conn: &mut AnyConnection,
    wallet_id: &str,
    e: &EntryRecord,
) -> Result<(), DbError> {
    insert_entries(conn, &[(wallet_id, e)]).await
}

/// A page of the statement: entries after `after_seq`, at most `limit`.
pub async fn entries_after(
    db: &Db,
    wallet_id: &str,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<EntryRecord>, DbError> {
    let rows = sqlx::query(
        "SELECT seq, kind, delta, balance_after, reference, description, created_at_us \
         FROM ledger_entries WHERE wallet_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(wallet_id)
    .bind(after_seq)
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|r| {
            let kind: String = r.try_get(1)?;
            Ok(EntryRecord {
                seq: r.try_get(0)?,
                kind: EntryKind::parse(&kind).ok_or_else(|| corrupt("entry kind"))?,
                delta: r.try_get(2)?,
                balance_after: r.try_get(3)?,
                reference: r.try_get(4)?,
                description: r.try_get(5)?,
                created_at: from_micros(r.try_get(6)?),
            })
        })
        .collect()
}

/// Sum of a wallet's ledger deltas (for invariant checks).
pub async fn ledger_sum(conn: &mut AnyConnection, wallet_id: &str) -> Result<i64, DbError> {
    // PostgreSQL's SUM(BIGINT) is NUMERIC, which the Any driver does not decode: cast it.
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(delta), 0) AS BIGINT) FROM ledger_entries WHERE wallet_id = $1",
    )
    .bind(wallet_id)
    .fetch_one(conn)
    .await?;
    Ok(row.try_get(0)?)
}

const PURCHASE_COLUMNS: &str = "purchase_id, wallet_id, origin_key, trigger, credits, amount_minor, \
     currency, payment_method, status, failure_reason, lot_id, expires_at_us, created_at_us";

fn purchase_from_row(r: &AnyRow) -> Result<PurchaseRecord, DbError> {
    let currency: Currency = r
        .try_get::<String, _>("currency")?
        .parse()
        .map_err(|_| corrupt("currency"))?;
    let trigger: String = r.try_get("trigger")?;
    let status: String = r.try_get("status")?;
    let expires: Option<i64> = r.try_get("expires_at_us")?;
    Ok(PurchaseRecord {
        purchase_id: r.try_get("purchase_id")?,
        wallet_id: r.try_get("wallet_id")?,
        origin_key: r.try_get("origin_key")?,
        trigger: PurchaseTrigger::parse(&trigger).ok_or_else(|| corrupt("trigger"))?,
        credits: r.try_get("credits")?,
        amount: Money::from_minor_units(r.try_get("amount_minor")?, currency),
        payment_method: r.try_get("payment_method")?,
        status: PurchaseStatus::parse(&status).ok_or_else(|| corrupt("purchase status"))?,
        failure_reason: r.try_get("failure_reason")?,
        lot_id: r.try_get("lot_id")?,
        expires_at: expires.map(from_micros),
        created_at: from_micros(r.try_get("created_at_us")?),
    })
}

/// A new purchase.
pub async fn insert_purchase(
    conn: &mut AnyConnection,
    p: &PurchaseRecord,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    let minor = p
        .amount
        .to_minor_units()
        .map_err(|e| corrupt(format!("purchase amount: {e}")))?;
    sqlx::query(&format!(
        "INSERT INTO purchases ({PURCHASE_COLUMNS}, updated_at_us) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
    ))
    .bind(&p.purchase_id)
    .bind(&p.wallet_id)
    .bind(&p.origin_key)
    .bind(p.trigger.as_str())
    .bind(p.credits)
    .bind(minor)
    .bind(p.amount.currency().code())
    .bind(&p.payment_method)
    .bind(p.status.as_str())
    .bind(&p.failure_reason)
    .bind(&p.lot_id)
    .bind(opt_micros(p.expires_at))
    .bind(micros(p.created_at))
    .bind(micros(now))
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes a purchase's status, reason and lot.
pub async fn update_purchase(
    conn: &mut AnyConnection,
    p: &PurchaseRecord,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE purchases SET status = $2, failure_reason = $3, lot_id = $4, updated_at_us = $5 \
         WHERE purchase_id = $1",
    )
    .bind(&p.purchase_id)
    .bind(p.status.as_str())
    .bind(&p.failure_reason)
    .bind(&p.lot_id)
    .bind(micros(now))
    .execute(conn)
    .await?;
    Ok(())
}

/// The purchase started by the request with idempotency key `origin_key`.
pub async fn purchase_by_origin(
    conn: &mut AnyConnection,
    origin_key: &str,
) -> Result<Option<PurchaseRecord>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {PURCHASE_COLUMNS} FROM purchases WHERE origin_key = $1"
    ))
    .bind(origin_key)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(purchase_from_row).transpose()
}

/// One purchase.
pub async fn purchase(
    conn: &mut AnyConnection,
    purchase_id: &str,
) -> Result<Option<PurchaseRecord>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {PURCHASE_COLUMNS} FROM purchases WHERE purchase_id = $1"
    ))
    .bind(purchase_id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(purchase_from_row).transpose()
}

/// Ids of purchases still open with the gateway (processing or awaiting settlement).
pub async fn open_purchase_ids(db: &Db, limit: i64) -> Result<Vec<String>, DbError> {
    let rows = sqlx::query(
        "SELECT purchase_id FROM purchases WHERE status IN ('processing', 'pending_settlement') \
         ORDER BY created_at_us LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

/// Credits bought automatically (C4, C5) since `since` that were not declined: what counts
/// against the monthly cap.
pub async fn auto_bought_since(
    conn: &mut AnyConnection,
    wallet_id: &str,
    since: DateTime<Utc>,
) -> Result<i64, DbError> {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(credits), 0) AS BIGINT) FROM purchases WHERE wallet_id = $1 \
         AND trigger IN ('auto_fixed', 'auto_shortfall') AND status <> 'failed' AND created_at_us >= $2",
    )
    .bind(wallet_id)
    .bind(micros(since))
    .fetch_one(conn)
    .await?;
    Ok(row.try_get(0)?)
}

/// Whether an automatic fixed top-up is still open for the wallet (one at a time).
pub async fn auto_fixed_in_flight(
    conn: &mut AnyConnection,
    wallet_id: &str,
) -> Result<bool, DbError> {
    let row = sqlx::query(
        "SELECT COUNT(*) FROM purchases WHERE wallet_id = $1 AND trigger = 'auto_fixed' \
         AND status IN ('processing', 'pending_settlement')",
    )
    .bind(wallet_id)
    .fetch_one(conn)
    .await?;
    Ok(row.try_get::<i64, _>(0)? > 0)
}

const RESERVATION_COLUMNS: &str =
    "reservation_id, wallet_id, mailing_id, credits, status, expires_at_us, captured_credits";

fn reservation_from_row(r: &AnyRow) -> Result<ReservationRecord, DbError> {
    let status: String = r.try_get("status")?;
    Ok(ReservationRecord {
        reservation_id: r.try_get("reservation_id")?,
        wallet_id: r.try_get("wallet_id")?,
        mailing_id: r.try_get("mailing_id")?,
        credits: r.try_get("credits")?,
        status: ReservationStatus::parse(&status).ok_or_else(|| corrupt("reservation status"))?,
        expires_at: from_micros(r.try_get("expires_at_us")?),
        captured_credits: r.try_get("captured_credits")?,
    })
}

/// Inserts new holds (each with its creation time), one multi-row statement per chunk.
pub async fn insert_reservations(
    conn: &mut AnyConnection,
    holds: &[(&ReservationRecord, DateTime<Utc>)],
) -> Result<(), DbError> {
    for chunk in row_chunks(Backend::of(conn), holds, 8, ROWS) {
        let sql = format!(
            "INSERT INTO reservations ({RESERVATION_COLUMNS}, created_at_us) {}",
            chunk.select()
        );
        let mut q = sqlx::query(&sql);
        for (r, created_at) in chunk.rows() {
            q = q
                .bind(&r.reservation_id)
                .bind(&r.wallet_id)
                .bind(&r.mailing_id)
                .bind(r.credits)
                .bind(r.status.as_str())
                .bind(micros(r.expires_at))
                .bind(r.captured_credits)
                .bind(micros(*created_at));
        }
        q.bind(chunk.count()).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Writes holds' status and captured credits, one `UPDATE ... FROM (VALUES ...)` per chunk;
/// each hold at most once in `holds`.
pub async fn update_reservations(
    conn: &mut AnyConnection,
    holds: &[&ReservationRecord],
) -> Result<(), DbError> {
    for chunk in row_chunks(Backend::of(conn), holds, 3, ROWS) {
        let sql = format!(
            "UPDATE reservations SET status = v.column2, captured_credits = v.column3 \
             FROM {} WHERE reservations.reservation_id = v.column1 AND {}",
            chunk.table(),
            chunk.real()
        );
        let mut q = sqlx::query(&sql);
        for r in chunk.rows() {
            q = q
                .bind(&r.reservation_id)
                .bind(r.status.as_str())
                .bind(r.captured_credits);
        }
        q.bind(chunk.count()).execute(&mut *conn).await?;
    }
    Ok(())
}

/// One hold of a wallet.
pub async fn reservation(
    conn: &mut AnyConnection,
    wallet_id: &str,
    reservation_id: &str,
) -> Result<Option<ReservationRecord>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {RESERVATION_COLUMNS} FROM reservations WHERE wallet_id = $1 AND reservation_id = $2"
    ))
    .bind(wallet_id)
    .bind(reservation_id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(reservation_from_row).transpose()
}

/// Active holds of a wallet that have lapsed by `now`.
pub async fn lapsed_reservations(
    conn: &mut AnyConnection,
    wallet_id: &str,
    now: DateTime<Utc>,
) -> Result<Vec<ReservationRecord>, DbError> {
    let rows = sqlx::query(&format!(
        "SELECT {RESERVATION_COLUMNS} FROM reservations \
         WHERE wallet_id = $1 AND status = 'active' AND expires_at_us <= $2"
    ))
    .bind(wallet_id)
    .bind(micros(now))
    .fetch_all(conn)
    .await?;
    rows.iter().map(reservation_from_row).collect()
}

/// Wallets with something due by `now`: lots past their expiry with credits left, or active
/// holds past theirs (the sweeper's work list).
pub async fn wallets_with_due_work(
    db: &Db,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<String>, DbError> {
    let rows = sqlx::query(
        "SELECT wallet_id FROM credit_lots WHERE remaining > 0 AND expires_at_us IS NOT NULL \
         AND expires_at_us <= $1 \
         UNION SELECT wallet_id FROM reservations WHERE status = 'active' AND expires_at_us <= $1 \
         LIMIT $2",
    )
    .bind(micros(now))
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

// Group commit (`crate::service::group_commit`): the same reads and writes as above, for many
// wallets in one statement each. Every list is cut into chunks far below either backend's
// parameter limit.

/// Rows per statement of the many-wallet writes below (half a full batch, at most 1,024 bound
/// parameters): one prepared statement for each power of two up to it ([`row_chunks`]).
const ROWS: usize = 128;

/// Reads and (on PostgreSQL) row-locks many wallets, in `wallet_id` byte order: every
/// transaction that locks more than one wallet takes them in that order (a transfer compares the
/// ids as Rust strings, hence `COLLATE "C"` rather than the database's collation), so two of
/// them never deadlock.
pub async fn lock_wallets(
    conn: &mut AnyConnection,
    db: &Db,
    wallet_ids: &[&str],
) -> Result<Vec<WalletRecord>, DbError> {
    fetch_in_lock_order(
        conn,
        db,
        &format!("SELECT {WALLET_COLUMNS} FROM wallets"),
        "wallet_id",
        wallet_ids.iter().copied(),
        true,
    )
    .await?
    .iter()
    .map(wallet_from_row)
    .collect()
}

/// [`lots_with_credits`] of many wallets.
pub async fn lots_of_wallets(
    conn: &mut AnyConnection,
    wallet_ids: &[&str],
) -> Result<HashMap<String, Vec<(Lot, i64)>>, DbError> {
    let mut out: HashMap<String, Vec<(Lot, i64)>> = HashMap::new();
    let rows = fetch_in(conn, wallet_ids, &[], |list, _| {
        format!(
            "SELECT wallet_id, lot_id, kind, remaining, expires_at_us, created_at_us, granted \
             FROM credit_lots WHERE wallet_id IN ({list}) AND remaining > 0"
        )
    })
    .await?;
    for row in rows {
        let wallet_id: String = row.try_get(0)?;
        out.entry(wallet_id)
            .or_default()
            .push(lot_from_row(&row, 1)?);
    }
    Ok(out)
}

/// [`auto_bought_since`] of many wallets (absent: none bought).
pub async fn auto_bought_since_many(
    conn: &mut AnyConnection,
    wallet_ids: &[&str],
    since: DateTime<Utc>,
) -> Result<HashMap<String, i64>, DbError> {
    let rows = fetch_in(conn, wallet_ids, &[micros(since)], |list, next| {
        format!(
            "SELECT wallet_id, CAST(COALESCE(SUM(credits), 0) AS BIGINT) FROM purchases \
             WHERE wallet_id IN ({list}) AND trigger IN ('auto_fixed', 'auto_shortfall') \
             AND status <> 'failed' AND created_at_us >= ${next} GROUP BY wallet_id"
        )
    })
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

/// [`lapsed_reservations`] of many wallets.
pub async fn lapsed_reservations_many(
    conn: &mut AnyConnection,
    wallet_ids: &[&str],
    now: DateTime<Utc>,
) -> Result<HashMap<String, Vec<ReservationRecord>>, DbError> {
    let mut out: HashMap<String, Vec<ReservationRecord>> = HashMap::new();
    let rows = fetch_in(conn, wallet_ids, &[micros(now)], |list, next| {
        format!(
            "SELECT {RESERVATION_COLUMNS} FROM reservations WHERE wallet_id IN ({list}) \
             AND status = 'active' AND expires_at_us <= ${next}"
        )
    })
    .await?;
    for row in rows {
        let r = reservation_from_row(&row)?;
        out.entry(r.wallet_id.clone()).or_default().push(r);
    }
    Ok(out)
}

/// The idempotency keys among `origin_keys` that started a purchase.
pub async fn purchase_origins(
    conn: &mut AnyConnection,
    origin_keys: &[&str],
) -> Result<HashSet<String>, DbError> {
    let rows = fetch_in(conn, origin_keys, &[], |list, _| {
        format!("SELECT origin_key FROM purchases WHERE origin_key IN ({list})")
    })
    .await?;
    rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
}

/// [`set_lot_remaining`] for many lots in one `UPDATE ... FROM (VALUES ...)` per chunk.
pub async fn set_lots_remaining(
    conn: &mut AnyConnection,
    lots: &[(&str, i64)],
) -> Result<(), DbError> {
    for chunk in row_chunks(Backend::of(conn), lots, 2, ROWS) {
        let sql = format!(
            "UPDATE credit_lots SET remaining = v.column2 FROM {} \
             WHERE credit_lots.lot_id = v.column1 AND {}",
            chunk.table(),
            chunk.real()
        );
        let mut q = sqlx::query(&sql);
        for (id, remaining) in chunk.rows() {
            q = q.bind(*id).bind(*remaining);
        }
        q.bind(chunk.count()).execute(&mut *conn).await?;
    }
    Ok(())
}

/// [`insert_entry`] for many entries in one multi-row `INSERT` per chunk.
pub async fn insert_entries(
    conn: &mut AnyConnection,
    entries: &[(&str, &EntryRecord)],
) -> Result<(), DbError> {
    for chunk in row_chunks(Backend::of(conn), entries, 8, ROWS) {
        let sql = format!(
            "INSERT INTO ledger_entries (wallet_id, seq, kind, delta, balance_after, reference, \
             description, created_at_us) {}",
            chunk.select()
        );
        let mut q = sqlx::query(&sql);
        for (wallet_id, e) in chunk.rows() {
            q = q
                .bind(*wallet_id)
                .bind(e.seq)
                .bind(e.kind.as_str())
                .bind(e.delta)
                .bind(e.balance_after)
                .bind(&e.reference)
                .bind(&e.description)
                .bind(micros(e.created_at));
        }
        q.bind(chunk.count()).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Writes back the columns a send changes (balance, held, debt, ledger sequence, reminder
/// state) of many wallets in one `UPDATE ... FROM (VALUES ...)` per chunk. The configuration
/// columns are left alone: a batch of sends never changes them.
pub async fn update_wallet_balances(
    conn: &mut AnyConnection,
    wallets: &[&WalletRecord],
) -> Result<(), DbError> {
    for chunk in row_chunks(Backend::of(conn), wallets, 6, ROWS) {
        let sql = format!(
            "UPDATE wallets SET balance = v.column2, held = v.column3, debt = v.column4, \
             ledger_seq = v.column5, reminder_armed = v.column6 FROM {} \
             WHERE wallets.wallet_id = v.column1 AND {}",
            chunk.table(),
            chunk.real()
        );
        let mut q = sqlx::query(&sql);
        for w in chunk.rows() {
            q = q
                .bind(&w.wallet_id)
                .bind(w.balance)
                .bind(w.held)
                .bind(w.debt)
                .bind(w.ledger_seq)
                .bind(i64::from(w.reminder.armed));
        }
        q.bind(chunk.count()).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Holds by id (whatever their wallet or status).
pub async fn reservations_many(
    conn: &mut AnyConnection,
    reservation_ids: &[&str],
) -> Result<HashMap<String, ReservationRecord>, DbError> {
    let rows = fetch_in(conn, reservation_ids, &[], |list, _| {
        format!("SELECT {RESERVATION_COLUMNS} FROM reservations WHERE reservation_id IN ({list})")
    })
    .await?;
    rows.iter()
        .map(|row| reservation_from_row(row).map(|r| (r.reservation_id.clone(), r)))
        .collect()
}
