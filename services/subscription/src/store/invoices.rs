//! The `invoices` table and its number counter: issuing, payment attempts and outcomes, the
//! jobs' lists of invoices to collect or poll, and the Stripe events applied once.

use chrono::{DateTime, Utc};
use runtime::{
    clock::from_micros,
    db::{Backend, Db, DbError, fetch_in_lock_order, row_chunks},
};
use shared::{Currency, Money};
use sqlx::{AnyConnection, Row, any::AnyRow};

use crate::{
    domain::Line,
    model::{InvoiceRecord, InvoiceStatus, PaymentKind},
};

use super::{ROWS_PER_STATEMENT, corrupt, from_json, json, micros, minor, u32_of, value_columns};

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
    .bind_payment(i)
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
            query = query.bind_payment(i);
        }
        query.bind(chunk.count()).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Binds an invoice's payment state in the order of [`update_invoice_payment`]'s parameters
/// (id, status, attempts, next attempt, paid at, payment kind, method, gateway key, returned
/// at): one list for the single and the many-row update.
trait BindPayment<'q> {
    fn bind_payment(self, i: &'q InvoiceRecord) -> Self;
}

impl<'q> BindPayment<'q> for sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    fn bind_payment(self, i: &'q InvoiceRecord) -> Self {
        self.bind(&i.invoice_id)
            .bind(i.status.as_str())
            .bind(i64::from(i.payment_attempts))
            .bind(i.next_attempt_at.map(micros))
            .bind(i.paid_at.map(micros))
            .bind(i.payment_kind.as_str())
            .bind(&i.payment_method)
            .bind(&i.gateway_key)
            .bind(i.returned_at.map(micros))
    }
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
