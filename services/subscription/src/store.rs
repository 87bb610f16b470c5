//! The service's schema and queries, written once for SQLite and PostgreSQL (sqlx `Any`; see
//! `runtime::db`). Functions taking `&mut AnyConnection` run inside the caller's transaction;
//! `lock_*` take row locks on PostgreSQL (SQLite's write transaction already excludes other
//! writers).

use chrono::{DateTime, Utc};
use runtime::{
    clock::from_micros,
    db::{Backend, Db, DbError, fetch_in_lock_order, row_chunks},
};
use rust_decimal::Decimal;
use shared::{Currency, Money};
use sqlx::{AnyConnection, Row, any::AnyRow};

use crate::{
    domain::{Change, Line, Plan, Product, Selection, Status, TrialTerms},
    model::{
        AccountRecord, ChangeRequestRecord, HistoryRecord, InvoiceRecord, InvoiceStatus,
        PaymentKind, RequestStatus, SubscriptionRecord,
    },
};

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

// ---- plans -------------------------------------------------------------------------------

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

// ---- accounts ----------------------------------------------------------------------------

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

// ---- subscriptions -----------------------------------------------------------------------

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

/// The lock suffix that lets concurrent claimers take different rows: on PostgreSQL a row
/// another replica's batch holds is skipped (it renews that one); SQLite's write transaction
/// already admits one claimer at a time, and whatever it renewed is no longer due for the next.
fn skip_locked(db: &Db) -> &'static str {
    match db.backend() {
        Backend::Sqlite => "",
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
    }
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

/// The key preview tokens are signed with (the migration generated it).
pub async fn preview_token_key(conn: &mut AnyConnection) -> Result<String, DbError> {
    let row = sqlx::query("SELECT secret FROM preview_token_key WHERE id = 1")
        .fetch_one(conn)
        .await?;
    Ok(row.try_get(0)?)
}

// ---- history -----------------------------------------------------------------------------

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

// ---- invoices ----------------------------------------------------------------------------

/// Invoice numbers for one transaction, taken as a range from the counter row. The first
/// [`InvoiceNumbers::take`] locks the row (PostgreSQL `FOR UPDATE`, SQLite's write
/// transaction) and reads it; later ones count on in memory; [`InvoiceNumbers::write_back`]
/// stores the end of the range in the same transaction, before it commits. So a batch of
/// invoices costs one lock, numbers stay consecutive, and a rolled-back transaction gives its
/// whole range back (the counter update rolls back with the invoices). A transaction that
/// inserted invoices but forgot the write-back would make the next one reuse its numbers,
/// which the unique index on `invoices.number` refuses: never a repeat, never a gap.
#[derive(Debug, Default)]
pub struct InvoiceNumbers {
    /// `(first taken, next to hand out)` once the counter is locked.
    range: Option<(i64, i64)>,
}

impl InvoiceNumbers {
    /// No number taken yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next number (locks and reads the counter on first use).
    pub async fn take(&mut self, conn: &mut AnyConnection, db: &Db) -> Result<i64, DbError> {
        let (first, next) = match self.range {
            Some(r) => r,
            None => {
                let n: i64 = sqlx::query(&format!(
                    "SELECT next_number FROM invoice_counter WHERE id = 1{}",
                    db.for_update()
                ))
                .fetch_one(&mut *conn)
                .await?
                .try_get(0)?;
                (n, n)
            }
        };
        self.range = Some((first, next + 1));
        Ok(next)
    }

    /// How many numbers were taken.
    pub fn taken(&self) -> i64 {
        self.range.map_or(0, |(first, next)| next - first)
    }

    /// Stores the counter past the last number taken (nothing if none was).
    pub async fn write_back(self, conn: &mut AnyConnection) -> Result<(), DbError> {
        if let Some((_, next)) = self.range {
            sqlx::query("UPDATE invoice_counter SET next_number = $1 WHERE id = 1")
                .bind(next)
                .execute(conn)
                .await?;
        }
        Ok(())
    }
}

const INVOICE_COLUMNS: &str = "invoice_id, number, account_id, subscription_id, kind, cycle, \
     currency, lines, subtotal_minor, vat_rate, vat_minor, total_minor, status, payment_kind, \
     payment_method, payment_attempts, next_attempt_at_us, issued_at_us, paid_at_us, gateway_key, \
     returned_at_us";

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredLine {
    description: String,
    amount_minor: i64,
}

fn invoice_from_row(r: &AnyRow) -> Result<InvoiceRecord, DbError> {
    let currency: Currency = r
        .try_get::<String, _>("currency")?
        .parse()
        .map_err(|_| corrupt("currency"))?;
    let lines: String = r.try_get("lines")?;
    let lines: Vec<StoredLine> = from_json("invoice lines", &lines)?;
    let status: String = r.try_get("status")?;
    let kind: String = r.try_get("payment_kind")?;
    let vat: String = r.try_get("vat_rate")?;
    Ok(InvoiceRecord {
        invoice_id: r.try_get("invoice_id")?,
        number: r.try_get("number")?,
        account_id: r.try_get("account_id")?,
        subscription_id: r.try_get("subscription_id")?,
        kind: r.try_get("kind")?,
        cycle: r.try_get("cycle")?,
        currency,
        lines: lines
            .into_iter()
            .map(|l| Line {
                description: l.description,
                amount: Money::from_minor_units(l.amount_minor, currency),
            })
            .collect(),
        subtotal: Money::from_minor_units(r.try_get("subtotal_minor")?, currency),
        vat_rate: vat.parse().map_err(|_| corrupt("vat_rate"))?,
        vat: Money::from_minor_units(r.try_get("vat_minor")?, currency),
        total: Money::from_minor_units(r.try_get("total_minor")?, currency),
        status: InvoiceStatus::parse(&status).ok_or_else(|| corrupt("invoice status"))?,
        payment_kind: PaymentKind::parse(&kind).ok_or_else(|| corrupt("payment_kind"))?,
        payment_method: r.try_get("payment_method")?,
        payment_attempts: u32_of(r.try_get("payment_attempts")?, "payment_attempts")?,
        next_attempt_at: r
            .try_get::<Option<i64>, _>("next_attempt_at_us")?
            .map(from_micros),
        issued_at: from_micros(r.try_get("issued_at_us")?),
        paid_at: r.try_get::<Option<i64>, _>("paid_at_us")?.map(from_micros),
        gateway_key: r.try_get("gateway_key")?,
        returned_at: r
            .try_get::<Option<i64>, _>("returned_at_us")?
            .map(from_micros),
    })
}

/// Stores a newly issued invoice.
pub async fn insert_invoice(conn: &mut AnyConnection, i: &InvoiceRecord) -> Result<(), DbError> {
    insert_invoices(conn, std::slice::from_ref(i)).await
}

/// Rows per multi-row statement: well under SQLite's 32,766 and PostgreSQL's 65,535 bound
/// parameters at 36 columns; one prepared statement for each power of two up to it
/// ([`row_chunks`]).
const ROWS_PER_STATEMENT: usize = 64;

/// Stores newly issued invoices, many rows per statement.
pub async fn insert_invoices(
    conn: &mut AnyConnection,
    invoices: &[InvoiceRecord],
) -> Result<(), DbError> {
    let columns = INVOICE_COLUMNS.split(',').count();
    // Each invoice with its lines as stored, serialized once (a piece's padding repeats rows).
    let rows = invoices
        .iter()
        .map(|i| {
            i.lines
                .iter()
                .map(|l| {
                    Ok(StoredLine {
                        description: l.description.clone(),
                        amount_minor: minor(&l.amount)?,
                    })
                })
                .collect::<Result<Vec<_>, DbError>>()
                .and_then(|lines| json(&lines))
                .map(|lines| (i, lines))
        })
        .collect::<Result<Vec<_>, DbError>>()?;
    for chunk in row_chunks(Backend::of(conn), &rows, columns, ROWS_PER_STATEMENT) {
        let q = format!(
            "INSERT INTO invoices ({INVOICE_COLUMNS}) {}",
            chunk.select()
        );
        let mut query = sqlx::query(&q);
        for (i, lines) in chunk.rows() {
            query = query
                .bind(&i.invoice_id)
                .bind(i.number)
                .bind(&i.account_id)
                .bind(&i.subscription_id)
                .bind(&i.kind)
                .bind(i.cycle)
                .bind(i.currency.code())
                .bind(lines)
                .bind(minor(&i.subtotal)?)
                .bind(i.vat_rate.to_string())
                .bind(minor(&i.vat)?)
                .bind(minor(&i.total)?)
                .bind(i.status.as_str())
                .bind(i.payment_kind.as_str())
                .bind(&i.payment_method)
                .bind(i64::from(i.payment_attempts))
                .bind(i.next_attempt_at.map(micros))
                .bind(micros(i.issued_at))
                .bind(i.paid_at.map(micros))
                .bind(&i.gateway_key)
                .bind(i.returned_at.map(micros));
        }
        query.bind(chunk.count()).execute(&mut *conn).await?;
    }
    Ok(())
}

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

/// Writes an invoice's payment state (status, attempts, next attempt, paid at, how it is paid,
/// the charge's key, a returned debit). Lines and amounts are never updated: an issued invoice
/// does not change.
pub async fn update_invoice_payment(
    conn: &mut AnyConnection,
    i: &InvoiceRecord,
) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE invoices SET status = $2, payment_attempts = $3, next_attempt_at_us = $4, \
         paid_at_us = $5, payment_kind = $6, payment_method = $7, gateway_key = $8, \
         returned_at_us = $9 WHERE invoice_id = $1",
    )
    .bind(&i.invoice_id)
    .bind(i.status.as_str())
    .bind(i64::from(i.payment_attempts))
    .bind(i.next_attempt_at.map(micros))
    .bind(i.paid_at.map(micros))
    .bind(i.payment_kind.as_str())
    .bind(&i.payment_method)
    .bind(&i.gateway_key)
    .bind(i.returned_at.map(micros))
    .execute(conn)
    .await?;
    Ok(())
}

/// [`update_invoice_payment`] for many invoices, many rows per statement.
pub async fn update_invoice_payments(
    conn: &mut AnyConnection,
    invoices: &[InvoiceRecord],
) -> Result<(), DbError> {
    const COLUMNS: &str = "invoice_id, status, payment_attempts, next_attempt_at_us, \
         paid_at_us, payment_kind, payment_method, gateway_key, returned_at_us";
    let sets = value_columns(&COLUMNS.split(',').map(str::trim).collect::<Vec<_>>());
    for chunk in row_chunks(Backend::of(conn), invoices, 9, ROWS_PER_STATEMENT) {
        let q = format!(
            "UPDATE invoices SET {sets} FROM {} WHERE invoices.invoice_id = v.column1 AND {}",
            chunk.table(),
            chunk.real()
        );
        let mut query = sqlx::query(&q);
        for i in chunk.rows() {
            query = query
                .bind(&i.invoice_id)
                .bind(i.status.as_str())
                .bind(i64::from(i.payment_attempts))
                .bind(i.next_attempt_at.map(micros))
                .bind(i.paid_at.map(micros))
                .bind(i.payment_kind.as_str())
                .bind(&i.payment_method)
                .bind(&i.gateway_key)
                .bind(i.returned_at.map(micros));
        }
        query.bind(chunk.count()).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Marks an open invoice's attempt whose outcome is unknown (asked again with the same key).
pub async fn mark_attempt_in_flight(
    conn: &mut AnyConnection,
    invoice_id: &str,
    gateway_key: &str,
) -> Result<(), DbError> {
    sqlx::query("UPDATE invoices SET gateway_key = $2 WHERE invoice_id = $1 AND status = 'open'")
        .bind(invoice_id)
        .bind(gateway_key)
        .execute(conn)
        .await?;
    Ok(())
}

/// Invoices by id (locked on PostgreSQL when `lock`, in byte order of the ids); unknown ids are left out.
pub async fn invoices_by_id(
    conn: &mut AnyConnection,
    db: &Db,
    invoice_ids: &[String],
    lock: bool,
) -> Result<Vec<InvoiceRecord>, DbError> {
    let rows = fetch_in_lock_order(
        conn,
        db,
        &format!("SELECT {INVOICE_COLUMNS} FROM invoices"),
        "invoice_id",
        invoice_ids.iter().map(String::as_str),
        lock,
    )
    .await?;
    rows.iter().map(invoice_from_row).collect()
}

/// One invoice (locked on PostgreSQL when `lock`).
pub async fn invoice(
    conn: &mut AnyConnection,
    db: &Db,
    invoice_id: &str,
    lock: bool,
) -> Result<Option<InvoiceRecord>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {INVOICE_COLUMNS} FROM invoices WHERE invoice_id = $1{}",
        if lock { db.for_update() } else { "" }
    ))
    .bind(invoice_id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(invoice_from_row).transpose()
}

/// An account's invoices by number.
pub async fn invoices_of(
    conn: &mut AnyConnection,
    account_id: &str,
) -> Result<Vec<InvoiceRecord>, DbError> {
    let rows = sqlx::query(&format!(
        "SELECT {INVOICE_COLUMNS} FROM invoices WHERE account_id = $1 ORDER BY number"
    ))
    .bind(account_id)
    .fetch_all(conn)
    .await?;
    rows.iter().map(invoice_from_row).collect()
}

/// Whether the account has an open bank-transfer invoice (S18).
pub async fn has_unpaid_bank_transfer(
    conn: &mut AnyConnection,
    account_id: &str,
) -> Result<bool, DbError> {
    let row = sqlx::query(
        "SELECT COUNT(*) FROM invoices WHERE account_id = $1 AND status = 'open' \
         AND payment_kind = 'bank_transfer'",
    )
    .bind(account_id)
    .fetch_one(conn)
    .await?;
    Ok(row.try_get::<i64, _>(0)? > 0)
}

/// Whether the account has an open invoice whose direct debit was returned.
pub async fn has_returned_debit(
    conn: &mut AnyConnection,
    account_id: &str,
) -> Result<bool, DbError> {
    let row = sqlx::query(
        "SELECT COUNT(*) FROM invoices WHERE account_id = $1 AND status = 'open' \
         AND returned_at_us IS NOT NULL",
    )
    .bind(account_id)
    .fetch_one(conn)
    .await?;
    Ok(row.try_get::<i64, _>(0)? > 0)
}

/// A subscription's open invoices (awaiting payment), oldest first.
pub async fn open_invoices(
    conn: &mut AnyConnection,
    subscription_id: &str,
) -> Result<Vec<InvoiceRecord>, DbError> {
    let rows = sqlx::query(&format!(
        "SELECT {INVOICE_COLUMNS} FROM invoices WHERE subscription_id = $1 AND status = 'open' \
         ORDER BY number"
    ))
    .bind(subscription_id)
    .fetch_all(conn)
    .await?;
    rows.iter().map(invoice_from_row).collect()
}

/// Records a Stripe webhook event as applied; `false` if it was recorded before (a repeated
/// delivery). Runs in the transaction that applies the event.
pub async fn record_stripe_event(
    conn: &mut AnyConnection,
    event_id: &str,
    event_type: &str,
    received_at: DateTime<Utc>,
) -> Result<bool, DbError> {
    let done = sqlx::query(
        "INSERT INTO stripe_events (event_id, event_type, received_at_us) VALUES ($1, $2, $3) \
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(event_id)
    .bind(event_type)
    .bind(micros(received_at))
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The invoice paid (or settling) by the charge with this gateway key.
pub async fn invoice_by_gateway_key(
    conn: &mut AnyConnection,
    gateway_key: &str,
) -> Result<Option<InvoiceRecord>, DbError> {
    let row = sqlx::query(&format!(
        "SELECT {INVOICE_COLUMNS} FROM invoices WHERE gateway_key = $1"
    ))
    .bind(gateway_key)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(invoice_from_row).transpose()
}

/// Invoices whose direct debit has not settled yet.
pub async fn pending_debit_invoices(db: &Db, limit: i64) -> Result<Vec<String>, DbError> {
    let rows = sqlx::query(
        "SELECT invoice_id FROM invoices WHERE status = 'pending' ORDER BY number LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

/// Accounts with a request's payment whose outcome has been unknown since `before` or longer.
pub async fn payments_in_flight(
    db: &Db,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<String>, DbError> {
    let rows = sqlx::query(
        "SELECT account_id FROM subscriptions WHERE payment_since_us IS NOT NULL \
         AND payment_since_us <= $1 ORDER BY payment_since_us LIMIT $2",
    )
    .bind(micros(before))
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

/// Open invoices charged by the gateway (card or direct debit) whose next attempt is due.
pub async fn due_card_invoices(
    db: &Db,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<String>, DbError> {
    let rows = sqlx::query(
        "SELECT invoice_id FROM invoices WHERE status = 'open' \
         AND payment_kind IN ('card', 'direct_debit') \
         AND next_attempt_at_us IS NOT NULL AND next_attempt_at_us <= $1 \
         ORDER BY number LIMIT $2",
    )
    .bind(micros(now))
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

// ---- change requests ---------------------------------------------------------------------

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
