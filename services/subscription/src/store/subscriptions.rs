//! The `subscriptions` table (one row per account) and its `history`: reads, row locks, the
//! renewal batch's claim, and the multi-row writes of a batch.

use chrono::{DateTime, Utc};
use runtime::{
    clock::from_micros,
    db::{Backend, Db, DbError, fetch_in_lock_order, row_chunks},
};
use rust_decimal::Decimal;
use sqlx::{AnyConnection, Row, any::AnyRow};

use crate::{
    domain::{Change, Selection, Status, TrialTerms},
    model::{HistoryRecord, PaymentKind, SubscriptionRecord},
};

use super::{
    ROWS_PER_STATEMENT, corrupt, from_json, i64_of, json, micros, skip_locked, u32_of, u64_of,
    value_columns,
};

const SUB_COLUMNS: &str = "subscription_id, account_id, plan_id, plan_version, status, contacts, \
     seats, add_ons, payment_kind, payment_method, vat_rate, anchor_us, period_index, cycle, \
     period_start_us, period_end_us, trial_ends_at_us, trial_days, trial_contact_cap, \
     trial_free_mails, trial_mails_sent, trial_ending_notified, cancel_at_period_end, scheduled, \
     active_contacts, pending_contacts, revision, pending_op, origin_key, allowance_cycle, \
     history_seq, created_at_us, allowance_month, allowance_next_us, payment_op, payment_since_us, \
     allowance_wait_us";

fn sub_from_row(r: &AnyRow) -> Result<SubscriptionRecord, DbError> {
    let status: String = r.try_get("status")?;
    let add_ons: String = r.try_get("add_ons")?;
    let kind: String = r.try_get("payment_kind")?;
    let vat: String = r.try_get("vat_rate")?;
    let scheduled: String = r.try_get("scheduled")?;
    let trial_days = u32_of(r.try_get("trial_days")?, "trial_days")?;
    Ok(SubscriptionRecord {
        subscription_id: r.try_get("subscription_id")?,
        account_id: r.try_get("account_id")?,
        plan_id: r.try_get("plan_id")?,
        plan_version: u32_of(r.try_get("plan_version")?, "plan_version")?,
        status: Status::parse(&status).ok_or_else(|| corrupt("status"))?,
        selection: Selection {
            contacts: u64_of(r.try_get("contacts")?, "contacts")?,
            seats: u32_of(r.try_get("seats")?, "seats")?,
            add_ons: from_json("add_ons", &add_ons)?,
        },
        payment_kind: PaymentKind::parse(&kind).ok_or_else(|| corrupt("payment_kind"))?,
        payment_method: r.try_get("payment_method")?,
        vat_rate: vat.parse::<Decimal>().map_err(|_| corrupt("vat_rate"))?,
        anchor: from_micros(r.try_get("anchor_us")?),
        period_index: u32_of(r.try_get("period_index")?, "period_index")?,
        cycle: r.try_get("cycle")?,
        period_start: from_micros(r.try_get("period_start_us")?),
        period_end: from_micros(r.try_get("period_end_us")?),
        trial_ends_at: r
            .try_get::<Option<i64>, _>("trial_ends_at_us")?
            .map(from_micros),
        trial: (trial_days > 0)
            .then(|| {
                Ok::<_, DbError>(TrialTerms {
                    days: trial_days,
                    contact_cap: u64_of(r.try_get("trial_contact_cap")?, "trial_contact_cap")?,
                    free_mails: u64_of(r.try_get("trial_free_mails")?, "trial_free_mails")?,
                })
            })
            .transpose()?,
        trial_mails_sent: u64_of(r.try_get("trial_mails_sent")?, "trial_mails_sent")?,
        trial_ending_notified: r.try_get::<i64, _>("trial_ending_notified")? != 0,
        cancel_at_period_end: r.try_get::<i64, _>("cancel_at_period_end")? != 0,
        scheduled: from_json::<Vec<Change>>("scheduled", &scheduled)?,
        active_contacts: u64_of(r.try_get("active_contacts")?, "active_contacts")?,
        pending_contacts: u64_of(r.try_get("pending_contacts")?, "pending_contacts")?,
        revision: r.try_get("revision")?,
        pending_op: r.try_get("pending_op")?,
        origin_key: r.try_get("origin_key")?,
        allowance_cycle: r.try_get("allowance_cycle")?,
        history_seq: r.try_get("history_seq")?,
        created_at: from_micros(r.try_get("created_at_us")?),
        allowance_month: r.try_get("allowance_month")?,
        allowance_next: r
            .try_get::<Option<i64>, _>("allowance_next_us")?
            .map(from_micros),
        payment_op: r
            .try_get::<Option<String>, _>("payment_op")?
            .map(|s| from_json("payment_op", &s))
            .transpose()?,
        payment_since: r
            .try_get::<Option<i64>, _>("payment_since_us")?
            .map(from_micros),
        allowance_wait: r
            .try_get::<Option<i64>, _>("allowance_wait_us")?
            .map(from_micros),
    })
}

/// Inserts a subscription; `false` when the account already has one.
pub async fn insert_subscription(
    conn: &mut AnyConnection,
    s: &SubscriptionRecord,
) -> Result<bool, DbError> {
    let placeholders = (1..=SUB_COLUMNS.split(',').count())
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let q = format!(
        "INSERT INTO subscriptions ({SUB_COLUMNS}) VALUES ({placeholders}) \
         ON CONFLICT (account_id) DO NOTHING"
    );
    let done = bind_sub(sqlx::query(&q), s)?.execute(conn).await?;
    Ok(done.rows_affected() == 1)
}

fn bind_sub<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    s: &'q SubscriptionRecord,
) -> Result<sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>, DbError> {
    let trial = s.trial.unwrap_or(TrialTerms {
        days: 0,
        contact_cap: 0,
        free_mails: 0,
    });
    Ok(q.bind(&s.subscription_id)
        .bind(&s.account_id)
        .bind(&s.plan_id)
        .bind(i64::from(s.plan_version))
        .bind(s.status.as_str())
        .bind(i64_of(s.selection.contacts))
        .bind(i64::from(s.selection.seats))
        .bind(json(&s.selection.add_ons)?)
        .bind(s.payment_kind.as_str())
        .bind(&s.payment_method)
        .bind(s.vat_rate.to_string())
        .bind(micros(s.anchor))
        .bind(i64::from(s.period_index))
        .bind(s.cycle)
        .bind(micros(s.period_start))
        .bind(micros(s.period_end))
        .bind(s.trial_ends_at.map(micros))
        .bind(i64::from(trial.days))
        .bind(i64_of(trial.contact_cap))
        .bind(i64_of(trial.free_mails))
        .bind(i64_of(s.trial_mails_sent))
        .bind(i64::from(s.trial_ending_notified))
        .bind(i64::from(s.cancel_at_period_end))
        .bind(json(&s.scheduled)?)
        .bind(i64_of(s.active_contacts))
        .bind(i64_of(s.pending_contacts))
        .bind(s.revision)
        .bind(&s.pending_op)
        .bind(&s.origin_key)
        .bind(s.allowance_cycle)
        .bind(s.history_seq)
        .bind(micros(s.created_at))
        .bind(s.allowance_month)
        .bind(s.allowance_next.map(micros))
        .bind(s.payment_op.as_ref().map(json).transpose()?)
        .bind(s.payment_since.map(micros))
        .bind(s.allowance_wait.map(micros)))
}

/// Writes back every column of a subscription.
pub async fn update_subscription(
    conn: &mut AnyConnection,
    s: &SubscriptionRecord,
) -> Result<(), DbError> {
    let sets = SUB_COLUMNS
        .split(',')
        .map(str::trim)
        .enumerate()
        .skip(1)
        .map(|(i, c)| format!("{c} = ${}", i + 1))
        .collect::<Vec<_>>()
        .join(", ");
    let q = format!("UPDATE subscriptions SET {sets} WHERE subscription_id = $1");
    bind_sub(sqlx::query(&q), s)?.execute(conn).await?;
    Ok(())
}

/// Deletes a subscription whose first payment was declined, with its history.
pub async fn delete_subscription(
    conn: &mut AnyConnection,
    subscription_id: &str,
) -> Result<(), DbError> {
    sqlx::query("DELETE FROM subscription_history WHERE subscription_id = $1")
        .bind(subscription_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM subscriptions WHERE subscription_id = $1")
        .bind(subscription_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Reads and (on PostgreSQL) row-locks the account's subscription.
pub async fn lock_subscription(
    conn: &mut AnyConnection,
    db: &Db,
    account_id: &str,
) -> Result<Option<SubscriptionRecord>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {SUB_COLUMNS} FROM subscriptions WHERE account_id = $1{}",
        db.for_update()
    ))
    .bind(account_id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(sub_from_row).transpose()
}

/// Reads the account's subscription without locking.
pub async fn read_subscription(
    conn: &mut AnyConnection,
    account_id: &str,
) -> Result<Option<SubscriptionRecord>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {SUB_COLUMNS} FROM subscriptions WHERE account_id = $1"
    ))
    .bind(account_id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(sub_from_row).transpose()
}

/// Claims (row-locks on PostgreSQL, skipping rows another transaction holds) up to `limit`
/// subscriptions with a period or trial end by `now` or a trial-ending notice due (ends by
/// `now + notice_us`), oldest due first, inside the caller's write transaction: the renewal
/// batch. Suspended subscriptions (nothing to do until paid) and those with a payment in
/// flight (`pending_op`, finished by their request or the reconciler first) are left out, so
/// every claimed row has a step to take and a full batch means more work is waiting. Ordered
/// by the indexed `period_end_us` alone: a second sort key would sort every due row (100,000
/// at once after one period end) for each batch instead of reading the first ones off the
/// index.
pub async fn claim_due_subscriptions(
    conn: &mut AnyConnection,
    db: &Db,
    now: DateTime<Utc>,
    notice_us: i64,
    limit: i64,
) -> Result<Vec<SubscriptionRecord>, DbError> {
    let rows = sqlx::query(&format!(
        "SELECT {SUB_COLUMNS} FROM subscriptions WHERE pending_op IS NULL AND ( \
         (status IN ('active', 'past_due', 'trialing') AND period_end_us <= $1) \
         OR (status = 'trialing' AND trial_ending_notified = 0 AND period_end_us <= $2)) \
         ORDER BY period_end_us LIMIT $3{}",
        skip_locked(db)
    ))
    .bind(micros(now))
    .bind(micros(now) + notice_us)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter().map(sub_from_row).collect()
}

/// Reads and (on PostgreSQL) row-locks the subscriptions of `account_ids`, in byte order of
/// the ids, so two batches locking overlapping sets never deadlock. Missing accounts are left
/// out.
pub async fn lock_subscriptions(
    conn: &mut AnyConnection,
    db: &Db,
    account_ids: &[String],
) -> Result<Vec<SubscriptionRecord>, DbError> {
    let rows = fetch_in_lock_order(
        conn,
        db,
        &format!("SELECT {SUB_COLUMNS} FROM subscriptions"),
        "account_id",
        account_ids.iter().map(String::as_str),
        true,
    )
    .await?;
    rows.iter().map(sub_from_row).collect()
}

/// The subscriptions of `account_ids`, without locking (e.g. to prepare wallet calls).
pub async fn read_subscriptions(
    db: &Db,
    account_ids: &[String],
) -> Result<Vec<SubscriptionRecord>, DbError> {
    let mut conn = db.pool().acquire().await?;
    let rows = fetch_in_lock_order(
        &mut conn,
        db,
        &format!("SELECT {SUB_COLUMNS} FROM subscriptions"),
        "account_id",
        account_ids.iter().map(String::as_str),
        false,
    )
    .await?;
    rows.iter().map(sub_from_row).collect()
}

/// Accounts whose plan credits are due in the wallet (C7): a cycle not granted yet, or the
/// next month of a yearly period. Renewal batches grant their own accounts; this lists the
/// rest (after Subscribe, a failed grant, a yearly plan's month), and those waiting for the
/// account's wallet to be opened once their retry time has come.
pub async fn due_allowances(
    db: &Db,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<String>, DbError> {
    let rows = sqlx::query(
        "SELECT account_id FROM subscriptions WHERE status IN ('active', 'past_due') \
         AND pending_op IS NULL AND (allowance_cycle < cycle OR allowance_next_us <= $1) \
         AND (allowance_wait_us IS NULL OR allowance_wait_us <= $1) \
         ORDER BY account_id LIMIT $2",
    )
    .bind(micros(now))
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

/// Appends a history entry.
pub async fn insert_history(
    conn: &mut AnyConnection,
    subscription_id: &str,
    h: &HistoryRecord,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO subscription_history (subscription_id, seq, at_us, actor, action, detail) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(subscription_id)
    .bind(h.seq)
    .bind(micros(h.at))
    .bind(&h.actor)
    .bind(&h.action)
    .bind(&h.detail)
    .execute(conn)
    .await?;
    Ok(())
}

/// The whole history, oldest first.
pub async fn history(
    conn: &mut AnyConnection,
    subscription_id: &str,
) -> Result<Vec<HistoryRecord>, DbError> {
    let rows = sqlx::query(
        "SELECT seq, at_us, actor, action, detail FROM subscription_history \
         WHERE subscription_id = $1 ORDER BY seq",
    )
    .bind(subscription_id)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(HistoryRecord {
                seq: r.try_get(0)?,
                at: from_micros(r.try_get(1)?),
                actor: r.try_get(2)?,
                action: r.try_get(3)?,
                detail: r.try_get(4)?,
            })
        })
        .collect()
}

/// Writes back every column of many subscriptions, many rows per statement (`UPDATE ... FROM`
/// a `VALUES` list, which both backends accept).
pub async fn update_subscriptions(
    conn: &mut AnyConnection,
    subs: &[SubscriptionRecord],
) -> Result<(), DbError> {
    let columns: Vec<&str> = SUB_COLUMNS.split(',').map(str::trim).collect();
    let sets = value_columns(&columns);
    for chunk in row_chunks(Backend::of(conn), subs, columns.len(), ROWS_PER_STATEMENT) {
        let q = format!(
            "UPDATE subscriptions SET {sets} FROM {} \
             WHERE subscriptions.subscription_id = v.column1 AND {}",
            chunk.table(),
            chunk.real()
        );
        let mut query = sqlx::query(&q);
        for s in chunk.rows() {
            query = bind_sub(query, s)?;
        }
        query.bind(chunk.count()).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Appends many history entries (`(subscription id, entry)`), many rows per statement.
pub async fn insert_history_many(
    conn: &mut AnyConnection,
    entries: &[(String, HistoryRecord)],
) -> Result<(), DbError> {
    for chunk in row_chunks(Backend::of(conn), entries, 6, ROWS_PER_STATEMENT * 4) {
        let q = format!(
            "INSERT INTO subscription_history (subscription_id, seq, at_us, actor, action, detail) \
             {}",
            chunk.select()
        );
        let mut query = sqlx::query(&q);
        for (subscription_id, h) in chunk.rows() {
            query = query
                .bind(subscription_id)
                .bind(h.seq)
                .bind(micros(h.at))
                .bind(&h.actor)
                .bind(&h.action)
                .bind(&h.detail);
        }
        query.bind(chunk.count()).execute(&mut *conn).await?;
    }
    Ok(())
}
