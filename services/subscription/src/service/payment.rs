//! The payment gateway (charges and their outcomes) and Stripe's webhooks (debit outcomes,
//! refunds and disputes).

use serde_json::json;
use shared::{ChargeOutcome, ChargeRequest, Currency, GatewayError, Money};
use sqlx::{Any, Transaction};

use crate::{
    domain::Status as SubStatus,
    error::SubError,
    model::{InvoiceRecord, InvoiceStatus, PaymentOp},
    store,
    unit::Unit,
};

use super::{Subscriptions, system};

/// What a gateway call came to.
pub(super) enum PaymentOutcome {
    Paid,
    /// A direct debit accepted: it settles (or comes back) days later.
    Pending,
    Declined(String),
    Unknown,
}

impl PaymentOutcome {
    /// What [`PaymentOp::outcome`] records.
    pub(super) fn recorded(&self) -> Option<String> {
        match self {
            PaymentOutcome::Paid => Some("paid".into()),
            PaymentOutcome::Pending => Some("pending".into()),
            PaymentOutcome::Declined(r) => Some(format!("{DECLINED}{r}")),
            PaymentOutcome::Unknown => None,
        }
    }
}

pub(super) const DECLINED: &str = "declined: ";

/// The reason a finished payment was declined for, if it was.
pub(super) fn declined(op: &PaymentOp) -> Option<&str> {
    op.outcome.as_deref().and_then(|o| o.strip_prefix(DECLINED))
}

/// How applying a request's payment outcome went.
pub(super) enum Finished {
    /// Applied now.
    Applied,
    /// Declined: applied now (nothing changed but the mark).
    Declined(String),
    /// Applied before (by the request or the jobs), or not this payment's turn.
    Earlier,
}

impl Subscriptions {
    pub(super) async fn charge(
        &self,
        invoice: &InvoiceRecord,
        gateway_key: &str,
    ) -> PaymentOutcome {
        let request = ChargeRequest {
            idempotency_key: gateway_key.to_string(),
            payment_method: invoice.payment_method.clone(),
            amount: invoice.total,
            description: format!("invoice {}", invoice.number),
            requested_at: self.now(),
        };
        self.gateway_charge(&request).await
    }

    /// A request's payment, again with its own gateway key: the provider answers a retry with
    /// the first outcome and never charges twice.
    pub(super) async fn charge_op(&self, op: &PaymentOp) -> PaymentOutcome {
        let currency = match op.currency.parse::<Currency>() {
            Ok(c) => c,
            Err(_) => {
                tracing::error!(key = %op.gateway_key, currency = %op.currency, "stored payment has a bad currency");
                return PaymentOutcome::Unknown;
            }
        };
        let request = ChargeRequest {
            idempotency_key: op.gateway_key.clone(),
            payment_method: op.payment_method.clone(),
            amount: Money::from_minor_units(op.amount_minor, currency),
            description: op.description.clone(),
            requested_at: self.now(),
        };
        self.gateway_charge(&request).await
    }

    pub(super) async fn gateway_charge(&self, request: &ChargeRequest) -> PaymentOutcome {
        match self.gateway.charge(request).await {
            Ok(ChargeOutcome::Succeeded { .. }) => PaymentOutcome::Paid,
            Ok(ChargeOutcome::Pending { .. }) => PaymentOutcome::Pending,
            Ok(ChargeOutcome::Declined { reason }) => PaymentOutcome::Declined(reason.to_string()),
            Err(GatewayError::Timeout) => {
                tracing::warn!(key = %request.idempotency_key, "gateway timed out; outcome unknown");
                PaymentOutcome::Unknown
            }
            Err(e) => PaymentOutcome::Declined(e.to_string()),
        }
    }

    /// Applies a direct debit's settlement or return to the invoice `invoice_id` of
    /// `account_id` in `tx`, if it is still pending (`false`: it is not, nothing changed).
    pub(super) async fn apply_debit_outcome(
        &self,
        tx: &mut Transaction<'static, Any>,
        account_id: &str,
        invoice_id: &str,
        outcome: PaymentOutcome,
    ) -> Result<bool, SubError> {
        let mut unit = Unit::lock(tx, &self.db, account_id, self.now()).await?;
        let mut invoice = match store::invoice(tx, &self.db, invoice_id, true).await? {
            Some(i) if i.status == InvoiceStatus::Pending => i,
            _ => return Ok(false),
        };
        let actor = system();
        let now = unit.now;
        if let PaymentOutcome::Declined(reason) = outcome {
            invoice.status = InvoiceStatus::Open;
            invoice.returned_at = Some(now);
            invoice.next_attempt_at = None;
            if matches!(unit.sub.status, SubStatus::Active | SubStatus::PastDue) {
                unit.sub.status = SubStatus::PastDue;
            }
            unit.record(
                &actor.0,
                "direct_debit_returned",
                format!("invoice {}: {reason}", invoice.number),
            );
            unit.event(
                "subscription.payment_returned",
                json!({"invoice_id": invoice.invoice_id, "number": invoice.number, "reason": reason}),
            );
        } else {
            invoice.status = InvoiceStatus::Paid;
            invoice.paid_at = Some(now);
            unit.record(
                &actor.0,
                "direct_debit_settled",
                format!("invoice {} paid", invoice.number),
            );
            unit.event(
                "subscription.invoice_paid",
                json!({"invoice_id": invoice.invoice_id, "number": invoice.number}),
            );
        }
        store::update_invoice_payment(tx, &invoice).await?;
        unit.save(tx).await?;
        Ok(true)
    }

    /// Applies a verified Stripe webhook event exactly once: its id is recorded in the
    /// transaction that applies it (`false`: delivered before, nothing changes). A
    /// `payment_intent.succeeded` or `.payment_failed` whose metadata `billing_key` is the
    /// gateway key of a pending direct-debit invoice settles or returns that invoice, as the
    /// jobs' polling would. Other events (card payments, whose outcome the paying request or
    /// the reconciler learns from the gateway, and events for nothing of ours) are recorded
    /// and change nothing. Refunds and disputes: [`Subscriptions::apply_stripe_reversal`].
    pub async fn apply_stripe_event(
        &self,
        event: &runtime::stripe_webhook::WebhookEvent,
    ) -> Result<bool, SubError> {
        let mut tx = self.db.begin_write().await?;
        if !runtime::stripe_webhook::record_event(
            &mut tx,
            &event.id,
            &event.kind,
            chrono::Utc::now(),
        )
        .await?
        {
            tx.rollback().await?;
            return Ok(false);
        }
        let (invoice, outcome) = match event.final_payment() {
            Some((key, declined)) => (
                store::invoice_by_gateway_key(&mut tx, key).await?,
                Some(declined.map_or(PaymentOutcome::Paid, PaymentOutcome::Declined)),
            ),
            None => (None, None),
        };
        if let (Some(invoice), Some(outcome)) = (invoice, outcome)
            && invoice.status == InvoiceStatus::Pending
        {
            self.apply_debit_outcome(&mut tx, &invoice.account_id, &invoice.invoice_id, outcome)
                .await?;
        }
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(true)
    }
}

impl Subscriptions {
    /// `charge.refunded` and `charge.dispute.created`: money paid for an invoice taken back. The
    /// event names only the PaymentIntent, so its metadata's `billing_key` (our gateway key)
    /// is fetched first, outside the transaction, and finds the invoice it paid. Applied once
    /// (the event id is recorded in the same transaction), and only to a `paid` invoice whose
    /// whole total came back ([`Reversal::is_whole`](runtime::stripe_webhook::Reversal::is_whole)):
    /// - a refund in full makes it `refunded` (`subscription.invoice_refunded`); the
    ///   subscription is not touched: refunding is the platform's own decision;
    /// - a dispute takes the money back without the platform's say: the invoice is open again
    ///   with `returned_at`, the subscription past due and its sending refused, exactly as for a
    ///   returned direct debit (`subscription.payment_returned`, reason `disputed`); it is not
    ///   charged again by itself but collected once the customer gives a new payment method;
    /// - a part taken back changes nothing but says so (`subscription.payment_partly_reversed`).
    ///
    /// A reversal of an invoice whose payment has no final outcome yet is an error (500), so
    /// Stripe delivers it again; one for nothing of ours is recorded and ignored.
    pub async fn apply_stripe_reversal(
        &self,
        event: &runtime::stripe_webhook::WebhookEvent,
        reversal: &runtime::stripe_webhook::Reversal,
    ) -> anyhow::Result<bool> {
        use runtime::stripe_webhook::ReversalKind;
        let (mut tx, mut unit, mut invoice) = match self
            .charge_event(event, reversal.payment_intent.as_deref())
            .await?
        {
            ChargeEvent::Seen => return Ok(false),
            ChargeEvent::NotOurs => return Ok(true),
            ChargeEvent::Invoice(found) => *found,
        };
        match invoice.status {
            InvoiceStatus::Paid => {}
            InvoiceStatus::Pending => {
                tx.rollback().await?;
                anyhow::bail!(
                    "invoice {} has no final payment outcome yet; {} is applied once it has",
                    invoice.invoice_id,
                    event.id
                );
            }
            InvoiceStatus::Open | InvoiceStatus::Void | InvoiceStatus::Refunded => {
                tracing::info!(invoice = %invoice.invoice_id, event = %event.id, status = invoice.status.as_str(), "Stripe refund or dispute for an invoice not paid now; nothing to take back");
                tx.commit().await?;
                return Ok(true);
            }
        }
        let total = total_minor(&invoice)?;
        let reason = reversal.kind.as_str();
        let actor = system();
        if !reversal.is_whole(total) {
            let reversed = Money::from_minor_units(reversal.amount, invoice.total.currency());
            unit.record(
                &actor.0,
                "payment_partly_reversed",
                format!("invoice {}: {reversed} {reason}", invoice.number),
            );
            unit.event(
                "subscription.payment_partly_reversed",
                json!({
                    "invoice_id": invoice.invoice_id, "number": invoice.number, "reason": reason,
                    "reversed_amount": reversed.amount_text(),
                    "currency": reversed.currency().code(),
                }),
            );
        } else if reversal.kind == ReversalKind::Refunded {
            invoice.status = InvoiceStatus::Refunded;
            unit.record(
                &actor.0,
                "invoice_refunded",
                format!("invoice {} refunded: {}", invoice.number, invoice.total),
            );
            unit.event(
                "subscription.invoice_refunded",
                json!({
                    "invoice_id": invoice.invoice_id, "number": invoice.number,
                    "amount": invoice.total.amount_text(),
                    "currency": invoice.total.currency().code(),
                }),
            );
        } else {
            invoice.status = InvoiceStatus::Open;
            invoice.paid_at = None;
            invoice.returned_at = Some(unit.now);
            invoice.next_attempt_at = None;
            if matches!(unit.sub.status, SubStatus::Active | SubStatus::PastDue) {
                unit.sub.status = SubStatus::PastDue;
            }
            unit.record(
                &actor.0,
                "payment_disputed",
                format!("invoice {}: the payment is disputed", invoice.number),
            );
            unit.event(
                "subscription.payment_returned",
                json!({"invoice_id": invoice.invoice_id, "number": invoice.number, "reason": reason}),
            );
        }
        store::update_invoice_payment(&mut tx, &invoice).await?;
        unit.save(&mut tx).await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(true)
    }
}

impl Subscriptions {
    /// `charge.dispute.closed` in the platform's favour (`won`, or an inquiry `warning_closed`):
    /// an invoice a whole dispute had reopened (open, with `returned_at`) is paid again by the
    /// money that came back: `paid`, the subscription active again if it was past due, history
    /// `dispute_won`, `subscription.payment_reinstated`. A dispute of a part reopened nothing
    /// and gives nothing back; a whole one whose creation is not applied yet is an error (500),
    /// so Stripe delivers the closing again after it. An invoice collected again meanwhile is
    /// found no more by this PaymentIntent (its key is the new attempt's): the closing is
    /// recorded and ignored, and the customer, who paid twice, is an operator's to refund.
    pub async fn apply_stripe_reinstatement(
        &self,
        event: &runtime::stripe_webhook::WebhookEvent,
        reinstatement: &runtime::stripe_webhook::Reinstatement,
    ) -> anyhow::Result<bool> {
        let (mut tx, mut unit, mut invoice) = match self
            .charge_event(event, reinstatement.payment_intent.as_deref())
            .await?
        {
            ChargeEvent::Seen => return Ok(false),
            ChargeEvent::NotOurs => return Ok(true),
            ChargeEvent::Invoice(found) => *found,
        };
        let total = total_minor(&invoice)?;
        let whole = reinstatement.is_whole(total);
        if whole && invoice.status == InvoiceStatus::Paid {
            tx.rollback().await?;
            anyhow::bail!(
                "invoice {}: the dispute closed by {} has not been applied yet",
                invoice.invoice_id,
                event.id
            );
        }
        if !(whole && invoice.status == InvoiceStatus::Open && invoice.returned_at.is_some()) {
            tracing::info!(invoice = %invoice.invoice_id, event = %event.id, status = invoice.status.as_str(), "Stripe dispute closed in our favour for an invoice it did not reopen; nothing to do");
            tx.commit().await?;
            return Ok(true);
        }
        invoice.status = InvoiceStatus::Paid;
        invoice.paid_at = Some(unit.now);
        invoice.returned_at = None;
        invoice.next_attempt_at = None;
        if unit.sub.status == SubStatus::PastDue {
            unit.sub.status = SubStatus::Active;
        }
        unit.record(
            &system().0,
            "dispute_won",
            format!("invoice {}: the disputed payment came back", invoice.number),
        );
        unit.event(
            "subscription.payment_reinstated",
            json!({"invoice_id": invoice.invoice_id, "number": invoice.number}),
        );
        store::update_invoice_payment(&mut tx, &invoice).await?;
        unit.save(&mut tx).await?;
        tx.commit().await?;
        self.platform.outbox.poke();
        Ok(true)
    }

    /// The transaction that records a charge-level event (a refund, a dispute) with the
    /// subscription locked and the invoice the event's PaymentIntent paid
    /// ([`runtime::stripe_webhook::begin_charge_event`]).
    async fn charge_event(
        &self,
        event: &runtime::stripe_webhook::WebhookEvent,
        payment_intent: Option<&str>,
    ) -> anyhow::Result<ChargeEvent> {
        let Some((mut tx, key)) = runtime::stripe_webhook::begin_charge_event(
            &self.db,
            self.gateway.as_ref(),
            event,
            payment_intent,
        )
        .await?
        else {
            return Ok(ChargeEvent::Seen);
        };
        let found = match &key {
            Some(key) => store::invoice_by_gateway_key(&mut tx, key).await?,
            None => None,
        };
        let Some(found) = found else {
            tracing::info!(event = %event.id, payment_intent = ?payment_intent, "Stripe refund or dispute for no invoice of this service; recorded and ignored");
            tx.commit().await?;
            return Ok(ChargeEvent::NotOurs);
        };
        let unit = Unit::lock(&mut tx, &self.db, &found.account_id, self.now()).await?;
        let invoice = store::invoice(&mut tx, &self.db, &found.invoice_id, true)
            .await?
            .ok_or_else(|| runtime::db::DbError::Corrupt("invoice vanished".into()))?;
        Ok(ChargeEvent::Invoice(Box::new((tx, unit, invoice))))
    }
}

/// `invoice`'s total in minor units, as a refund or a dispute names amounts.
fn total_minor(invoice: &InvoiceRecord) -> Result<i64, runtime::db::DbError> {
    invoice.total.to_minor_units().map_err(|e| {
        runtime::db::DbError::Corrupt(format!("invoice {} total: {e}", invoice.invoice_id))
    })
}

/// A charge-level Stripe event, read by [`Subscriptions::charge_event`].
enum ChargeEvent {
    /// Applied before (its id is recorded): nothing to do.
    Seen,
    /// About no invoice of this service: recorded, committed, nothing else to do.
    NotOurs,
    /// Recorded in this transaction, not committed yet, with the invoice's subscription locked
    /// and the invoice read under that lock.
    Invoice(Box<(Transaction<'static, Any>, Unit, InvoiceRecord)>),
}

/// The subscription service's side of Stripe's webhooks (`runtime::stripe_webhook`).
pub struct StripeEvents(pub Subscriptions);

#[tonic::async_trait]
impl runtime::stripe_webhook::WebhookHandler for StripeEvents {
    async fn apply(&self, event: &runtime::stripe_webhook::WebhookEvent) -> anyhow::Result<bool> {
        if let Some(reversal) = &event.reversal {
            return self.0.apply_stripe_reversal(event, reversal).await;
        }
        if let Some(reinstatement) = &event.reinstatement {
            return self
                .0
                .apply_stripe_reinstatement(event, reinstatement)
                .await;
        }
        Ok(self.0.apply_stripe_event(event).await?)
    }
}
