//! One subscription locked inside a write transaction: changes made in memory, then saved with
//! their history entries and outbox events in the same transaction. Invoices are numbered and
//! inserted at once (the counter row stays locked until the transaction ends); a batch of units
//! in one transaction shares one [`InvoiceNumbers`] range.

use chrono::{DateTime, Utc};
use runtime::{db::Db, outbox};
use serde_json::{Value, json};
use sqlx::AnyConnection;

use crate::{
    domain::Bill,
    error::SubError,
    model::{HistoryRecord, InvoiceRecord, InvoiceStatus, SubscriptionRecord},
    store::{self, InvoiceNumbers},
};

/// The gateway charge an invoice is issued after (an immediate change paid first, S6).
#[derive(Debug, Clone)]
pub struct Charged {
    /// The charge's gateway key.
    pub gateway_key: String,
    /// Money captured (`false`: a direct debit that settles later).
    pub captured: bool,
}

/// A locked subscription and what this transaction does to it.
#[derive(Debug)]
pub struct Unit {
    /// The record as it will be saved.
    pub sub: SubscriptionRecord,
    /// The transaction's instant (the service clock).
    pub now: DateTime<Utc>,
    is_new: bool,
    history: Vec<HistoryRecord>,
    events: Vec<(&'static str, Value)>,
    issued: Vec<InvoiceRecord>,
    /// Issued invoices not inserted yet (their insert waits for [`Writes::flush`]).
    unsaved: Vec<InvoiceRecord>,
    defer: bool,
    /// The next invoice is charged by the caller: no first attempt for the collector.
    caller_charges: bool,
}

/// What many units of one transaction write, gathered by [`Unit::save_to`] and written with a
/// few multi-row statements by [`Writes::flush`] (a batch of renewals would otherwise cost a
/// round trip per row).
#[derive(Debug, Default)]
pub struct Writes {
    subs: Vec<SubscriptionRecord>,
    history: Vec<(String, HistoryRecord)>,
    invoices: Vec<InvoiceRecord>,
    events: Vec<(&'static str, String, Value, i64)>,
}

impl Writes {
    /// Nothing gathered yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes everything gathered in the caller's transaction: invoices, subscriptions,
    /// history, then the outbox events.
    pub async fn flush(self, conn: &mut AnyConnection) -> Result<(), SubError> {
        store::insert_invoices(conn, &self.invoices).await?;
        store::update_subscriptions(conn, &self.subs).await?;
        store::insert_history_many(conn, &self.history).await?;
        let events: Vec<(&str, &str, &Value, i64)> = self
            .events
            .iter()
            .map(|(t, subject, payload, at)| (*t, subject.as_str(), payload, *at))
            .collect();
        outbox::append_many(conn, &events).await?;
        Ok(())
    }
}

impl Unit {
    /// A subscription to insert on save.
    pub fn create(sub: SubscriptionRecord, now: DateTime<Utc>) -> Unit {
        Unit {
            sub,
            now,
            is_new: true,
            history: Vec::new(),
            events: Vec::new(),
            issued: Vec::new(),
            unsaved: Vec::new(),
            defer: false,
            caller_charges: false,
        }
    }

    /// Treats a record already read under this transaction's lock as existing (updated on
    /// save, not inserted).
    pub fn mark_existing(&mut self) {
        self.is_new = false;
    }

    /// A record the caller read under this transaction's lock (e.g. a claimed batch), saved
    /// with [`Unit::save_to`]: its invoices are inserted with the batch's other writes.
    pub fn locked(sub: SubscriptionRecord, now: DateTime<Utc>) -> Unit {
        let mut unit = Unit::create(sub, now);
        unit.mark_existing();
        unit.defer = true;
        unit
    }

    /// The next invoice issued is charged by the caller (Subscribe's first payment), so no
    /// attempt is due for the collector.
    pub fn charged_by_caller(&mut self) {
        self.caller_charges = true;
    }

    /// The invoices issued in this unit so far, handed over once (e.g. to collect after the
    /// commit).
    pub fn take_issued(&mut self) -> Vec<InvoiceRecord> {
        std::mem::take(&mut self.issued)
    }

    /// Locks the account's subscription (row lock on PostgreSQL).
    pub async fn lock(
        conn: &mut AnyConnection,
        db: &Db,
        account_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Unit, SubError> {
        let sub = store::lock_subscription(conn, db, account_id)
            .await?
            .ok_or_else(|| SubError::SubscriptionNotFound(account_id.to_string()))?;
        Ok(Unit {
            sub,
            now,
            is_new: false,
            history: Vec::new(),
            events: Vec::new(),
            issued: Vec::new(),
            unsaved: Vec::new(),
            defer: false,
            caller_charges: false,
        })
    }

    /// Records a change and who made it in the subscription's history.
    pub fn record(&mut self, actor: &str, action: &str, detail: impl Into<String>) {
        self.sub.history_seq += 1;
        self.history.push(HistoryRecord {
            seq: self.sub.history_seq,
            at: self.now,
            actor: actor.to_string(),
            action: action.to_string(),
            detail: detail.into(),
        });
    }

    /// Queues an outbox event about this subscription (account and subscription ids added).
    pub fn event(&mut self, event_type: &'static str, mut payload: Value) {
        if let Value::Object(map) = &mut payload {
            map.insert("account_id".into(), json!(self.sub.account_id));
            map.insert("subscription_id".into(), json!(self.sub.subscription_id));
        }
        self.events.push((event_type, payload));
    }

    /// Issues an invoice now: the next consecutive number, inserted in this transaction, with
    /// an `invoice.issued` event. A card or direct-debit invoice is open with its first attempt
    /// due at once unless `charged` before issuing (paid, or pending while a debit settles); a
    /// bank-transfer invoice stays open (S18).
    pub async fn issue(
        &mut self,
        conn: &mut AnyConnection,
        db: &Db,
        kind: &str,
        cycle: Option<i64>,
        bill: Bill,
        charged: Option<Charged>,
    ) -> Result<InvoiceRecord, SubError> {
        let mut numbers = InvoiceNumbers::new();
        let invoice = self
            .issue_numbered(conn, db, &mut numbers, kind, cycle, bill, charged)
            .await?;
        numbers.write_back(conn).await?;
        Ok(invoice)
    }

    /// [`Unit::issue`] with a number from the transaction's range; the caller writes the range
    /// back before committing.
    #[allow(clippy::too_many_arguments)]
    pub async fn issue_numbered(
        &mut self,
        conn: &mut AnyConnection,
        db: &Db,
        numbers: &mut InvoiceNumbers,
        kind: &str,
        cycle: Option<i64>,
        bill: Bill,
        charged: Option<Charged>,
    ) -> Result<InvoiceRecord, SubError> {
        let number = numbers.take(conn, db).await?;
        let nothing_due = !bill.total.is_positive();
        let status = match &charged {
            Some(c) if !c.captured => InvoiceStatus::Pending,
            Some(_) => InvoiceStatus::Paid,
            None if nothing_due => InvoiceStatus::Paid,
            None => InvoiceStatus::Open,
        };
        let collectable = self.sub.payment_kind.charged_by_gateway();
        let invoice = InvoiceRecord {
            invoice_id: format!("inv_{}", uuid::Uuid::now_v7().simple()),
            number,
            account_id: self.sub.account_id.clone(),
            subscription_id: self.sub.subscription_id.clone(),
            kind: kind.to_string(),
            cycle,
            currency: bill.total.currency(),
            lines: bill.lines,
            subtotal: bill.subtotal,
            vat_rate: bill.vat_rate,
            vat: bill.vat,
            total: bill.total,
            status,
            payment_kind: self.sub.payment_kind,
            payment_method: self.sub.payment_method.clone(),
            payment_attempts: u32::from(charged.is_some()),
            next_attempt_at: (status == InvoiceStatus::Open && collectable && !self.caller_charges)
                .then_some(self.now),
            issued_at: self.now,
            paid_at: (status == InvoiceStatus::Paid).then_some(self.now),
            gateway_key: charged.map(|c| c.gateway_key).unwrap_or_default(),
            returned_at: None,
        };
        self.caller_charges = false;
        if self.defer {
            self.unsaved.push(invoice.clone());
        } else {
            store::insert_invoice(conn, &invoice).await?;
        }
        self.event(
            "subscription.invoice_issued",
            json!({
                "invoice_id": invoice.invoice_id, "number": invoice.number, "kind": kind,
                "total": invoice.total.amount_text(), "currency": invoice.currency.code(),
                "status": invoice.status.as_str(),
            }),
        );
        self.issued.push(invoice.clone());
        Ok(invoice)
    }

    /// Gathers an existing record, its invoices, history and events into `writes` (written by
    /// [`Writes::flush`] in the same transaction).
    pub fn save_to(self, writes: &mut Writes) -> SubscriptionRecord {
        let at = self.now.timestamp_micros();
        let id = &self.sub.subscription_id;
        writes.invoices.extend(self.unsaved);
        writes
            .history
            .extend(self.history.into_iter().map(|h| (id.clone(), h)));
        writes.events.extend(
            self.events
                .into_iter()
                .map(|(t, payload)| (t, id.clone(), payload, at)),
        );
        writes.subs.push(self.sub.clone());
        self.sub
    }

    /// Saves the record, its history and its events in the caller's transaction.
    pub async fn save(self, conn: &mut AnyConnection) -> Result<SubscriptionRecord, SubError> {
        if self.is_new {
            if !store::insert_subscription(conn, &self.sub).await? {
                return Err(SubError::AlreadySubscribed(self.sub.account_id.clone()));
            }
        } else {
            store::update_subscription(conn, &self.sub).await?;
        }
        store::insert_invoices(conn, &self.unsaved).await?;
        for h in &self.history {
            store::insert_history(conn, &self.sub.subscription_id, h).await?;
        }
        let at = self.now.timestamp_micros();
        for (event_type, payload) in &self.events {
            outbox::append(conn, event_type, &self.sub.subscription_id, payload, at).await?;
        }
        Ok(self.sub)
    }
}
