//! Collecting unpaid invoices: gateway attempts, retries and suspension (dunning), with the
//! credits a renewal batch leaves to grant.

use std::collections::{BTreeMap, HashMap};

use chrono::Duration;
use futures::{StreamExt, stream};
use serde_json::json;

use crate::{
    domain::{self, Status as SubStatus},
    error::SubError,
    model::{InvoiceRecord, InvoiceStatus, SubscriptionRecord},
    store,
    unit::{Unit, Writes},
    wallet::GrantOutcome,
};

use super::{
    Subscriptions,
    payment::PaymentOutcome,
    renewal::{Allowance, WALLET_WAIT_RETRY_SECONDS},
    system,
};

/// Gateway charges and wallet grants a batch runs at once (bounded, so a slow provider or
/// wallet sees a fixed number of calls in flight per replica).
const CONCURRENT_CALLS: usize = 32;

impl Subscriptions {
    /// One gateway attempt on an open invoice (renewals, conversions, retries, a new payment
    /// method): paid; pending while a direct debit settles; or past due with a retry, or
    /// suspended when retries are used up. The key names the invoice and the attempt, so an
    /// attempt whose outcome stayed unknown is asked again with the same key on the next run.
    pub async fn collect(&self, invoice_id: &str) -> Result<(), SubError> {
        self.collect_many(&[invoice_id.to_string()]).await
    }

    /// [`Subscriptions::collect`] for many invoices (read now, without the lock).
    pub async fn collect_many(&self, invoice_ids: &[String]) -> Result<(), SubError> {
        let invoices = {
            let mut conn = self.conn().await?;
            store::invoices_by_id(&mut conn, &self.db, invoice_ids, false).await?
        };
        self.collect_issued(invoices).await
    }

    /// The next gateway attempt on each of `invoices` (as read, e.g. just issued by a renewal
    /// batch): see [`Subscriptions::charge_and_grant`].
    pub async fn collect_issued(&self, invoices: Vec<InvoiceRecord>) -> Result<(), SubError> {
        self.charge_and_grant(invoices, Vec::new())
            .await
            .map(|_| ())
    }

    /// The work a renewal batch leaves for after its commit, outside any transaction: the next
    /// gateway attempt on each of `invoices` and the month of credits due on each of `subs`
    /// (both read without the lock), run concurrently and bounded (each charge keyed by invoice
    /// and attempt, each grant by subscription, cycle and month). Then one write transaction
    /// applies what came back, each under its subscription's (and invoice's) lock and only
    /// where it was not applied already: an invoice still open at that attempt with that
    /// payment method, a subscription still in that cycle with that month not recorded. An
    /// attempt whose outcome is unknown is marked to be asked again with its key. Returns how
    /// many months of credits were recorded.
    pub async fn charge_and_grant(
        &self,
        invoices: Vec<InvoiceRecord>,
        subs: Vec<SubscriptionRecord>,
    ) -> Result<usize, SubError> {
        let now = self.now();
        let mut due = Vec::new();
        for sub in &subs {
            let plan = self.plan_version(&sub.plan_id, sub.plan_version).await?;
            if let Some(a) = self.allowance_due(sub, &plan, now)? {
                due.push(a);
            }
        }
        let charges = stream::iter(invoices)
            .map(|invoice| async move {
                let attempt = invoice.payment_attempts + 1;
                let gateway_key = format!("{}:{attempt}", invoice.invoice_id);
                let outcome = self.charge(&invoice, &gateway_key).await;
                (invoice, attempt, gateway_key, outcome)
            })
            .buffer_unordered(CONCURRENT_CALLS)
            .collect::<Vec<_>>();
        let grants = stream::iter(due)
            .map(|a| async move {
                match self.call_wallet(&a).await {
                    GrantOutcome::Failed => None,
                    outcome => Some((a, outcome)),
                }
            })
            .buffer_unordered(CONCURRENT_CALLS)
            .filter_map(|a| async move { a })
            .collect::<Vec<(Allowance, GrantOutcome)>>();
        let (attempts, granted) = futures::join!(charges, grants);
        let (unknown, mut known): (Vec<_>, Vec<_>) = attempts
            .into_iter()
            .partition(|(_, _, _, outcome)| matches!(outcome, PaymentOutcome::Unknown));
        if !unknown.is_empty() {
            // The money may be taken: the next run asks again with this key, and the payment
            // method cannot change until it has (UpdatePaymentMethod checks the mark).
            let mut conn = self.conn().await?;
            for (invoice, _, gateway_key, _) in &unknown {
                store::mark_attempt_in_flight(&mut conn, &invoice.invoice_id, gateway_key).await?;
            }
        }
        if known.is_empty() && granted.is_empty() {
            return Ok(0);
        }
        // Several invoices of one subscription are applied in the order they were issued.
        known.sort_by_key(|(invoice, ..)| invoice.number);
        let mut accounts: Vec<String> = known
            .iter()
            .map(|(i, ..)| i.account_id.clone())
            .chain(granted.iter().map(|(a, _)| a.account_id.clone()))
            .collect();
        accounts.sort();
        accounts.dedup();
        let ids: Vec<String> = known.iter().map(|(i, ..)| i.invoice_id.clone()).collect();
        let mut tx = self.db.begin_write().await?;
        let now = self.now();
        let mut units: BTreeMap<String, (Unit, bool)> =
            store::lock_subscriptions(&mut tx, &self.db, &accounts)
                .await?
                .into_iter()
                .map(|s| (s.account_id.clone(), (Unit::locked(s, now), false)))
                .collect();
        let mut current: HashMap<String, InvoiceRecord> =
            store::invoices_by_id(&mut tx, &self.db, &ids, true)
                .await?
                .into_iter()
                .map(|i| (i.invoice_id.clone(), i))
                .collect();
        let mut attempted = Vec::with_capacity(current.len());
        for (seen, attempt, gateway_key, outcome) in known {
            let Some((unit, touched)) = units.get_mut(&seen.account_id) else {
                continue;
            };
            let Some(mut invoice) = current.remove(&seen.invoice_id).filter(|i| {
                i.status == InvoiceStatus::Open
                    && i.payment_attempts + 1 == attempt
                    && i.payment_method == seen.payment_method
            }) else {
                continue;
            };
            Self::apply_attempt(unit, &mut invoice, attempt, gateway_key, outcome);
            attempted.push(invoice);
            *touched = true;
        }
        store::update_invoice_payments(&mut tx, &attempted).await?;
        let mut recorded = 0;
        for (a, outcome) in granted {
            let Some((unit, touched)) = units.get_mut(&a.account_id) else {
                continue;
            };
            let s = &mut unit.sub;
            if s.cycle != a.cycle || (s.allowance_cycle, s.allowance_month) >= (a.cycle, a.index) {
                continue;
            }
            if outcome == GrantOutcome::NoWallet {
                // Not granted, so not recorded: the month stays due and the jobs ask again
                // (within the month, its credits expiring at its end as they would have).
                let first = s.allowance_wait.is_none();
                let retry = now + Duration::seconds(WALLET_WAIT_RETRY_SECONDS);
                s.allowance_wait = Some(retry);
                if let (true, Some(m)) = (first, a.month) {
                    let wallet_id = unit.sub.account_id.clone();
                    unit.event(
                        "subscription.credits_waiting_for_wallet",
                        json!({
                            "credits": a.credits, "cycle": a.cycle, "month": m.index,
                            "wallet_id": wallet_id, "retry_at": retry.to_rfc3339(),
                            "expires_at": m.end.to_rfc3339(),
                        }),
                    );
                }
                *touched = true;
                continue;
            }
            s.allowance_wait = None;
            s.allowance_cycle = a.cycle;
            s.allowance_month = a.index;
            // A yearly plan's next month is due at this month's end.
            s.allowance_next = a.month.filter(|m| !m.last && a.credits > 0).map(|m| m.end);
            if let (Some(m), true) = (a.month, a.grant.is_some()) {
                unit.event(
                    "subscription.credits_granted",
                    json!({"credits": a.credits, "cycle": a.cycle, "month": m.index, "expires_at": m.end.to_rfc3339()}),
                );
            }
            *touched = true;
            recorded += 1;
        }
        let mut writes = Writes::new();
        let mut saved = 0;
        for (unit, touched) in units.into_values() {
            if touched {
                unit.save_to(&mut writes);
                saved += 1;
            }
        }
        if saved > 0 {
            writes.flush(&mut tx).await?;
            tx.commit().await?;
            self.platform.outbox.poke();
        } else {
            tx.rollback().await?;
        }
        Ok(recorded)
    }

    /// Applies one attempt's known outcome to a locked subscription and its open invoice.
    pub(super) fn apply_attempt(
        unit: &mut Unit,
        invoice: &mut InvoiceRecord,
        attempt: u32,
        gateway_key: String,
        outcome: PaymentOutcome,
    ) {
        let now = unit.now;
        invoice.payment_attempts = attempt;
        let actor = system();
        match outcome {
            PaymentOutcome::Paid | PaymentOutcome::Pending | PaymentOutcome::Unknown => {
                let captured = !matches!(outcome, PaymentOutcome::Pending);
                invoice.gateway_key = gateway_key;
                invoice.next_attempt_at = None;
                if matches!(unit.sub.status, SubStatus::PastDue | SubStatus::Suspended) {
                    unit.sub.status = SubStatus::Active;
                }
                if captured {
                    invoice.status = InvoiceStatus::Paid;
                    invoice.paid_at = Some(now);
                    unit.record(
                        &actor.0,
                        "payment_succeeded",
                        format!("invoice {}", invoice.number),
                    );
                    unit.event(
                        "subscription.invoice_paid",
                        json!({"invoice_id": invoice.invoice_id, "number": invoice.number}),
                    );
                } else {
                    invoice.status = InvoiceStatus::Pending;
                    unit.record(
                        &actor.0,
                        "direct_debit_submitted",
                        format!("invoice {}", invoice.number),
                    );
                    unit.event(
                        "subscription.invoice_payment_pending",
                        json!({"invoice_id": invoice.invoice_id, "number": invoice.number}),
                    );
                }
            }
            PaymentOutcome::Declined(reason) => {
                invoice.gateway_key = gateway_key;
                invoice.next_attempt_at = domain::next_retry(attempt, now);
                let last = invoice.next_attempt_at.is_none();
                if unit.sub.status.is_live() {
                    unit.sub.status = if last {
                        SubStatus::Suspended
                    } else {
                        SubStatus::PastDue
                    };
                }
                unit.record(
                    &actor.0,
                    "payment_failed",
                    format!("invoice {} attempt {attempt}: {reason}", invoice.number),
                );
                unit.event(
                    "subscription.payment_failed",
                    json!({"invoice_id": invoice.invoice_id, "attempt": attempt, "reason": reason, "final": last}),
                );
            }
        }
    }
}
